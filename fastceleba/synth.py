"""Synthetic CelebA: face-like pictures and annotations in the exact CelebA on-disk layout.

No CelebA can be downloaded where this project is built and tested, so tests, the demo and the
benchmarks run on data made here. ``generate(root, n)`` writes::

    root/img_align_celeba/000001.jpg ...      178 wide x 218 high RGB JPEGs (quality 90, ~5-15 KB)
    root/list_eval_partition.txt              "000001.jpg 0" (0 train, 1 valid, 2 test)
    root/list_attr_celeba.txt                 count, 40 names, "000001.jpg -1  1 ..." rows
    root/identity_CelebA.txt                  "000001.jpg 2880"
    root/list_landmarks_align_celeba.txt      count, 10 names, "000001.jpg    69  109 ..." rows

Text layout matched to the official files (checked against copies of their first rows quoted in
public repositories; the official files themselves cannot be fetched here):

* ``list_attr_celeba.txt``: line 1 the count; line 2 the 40 names joined by single spaces WITH a
  trailing space (``"... Wearing_Necktie Young \\n"``, as the official header); rows are the file
  name then ``" %2d"`` per value, so ``"000001.jpg -1  1  1 -1"`` (no trailing space).
* ``list_landmarks_align_celeba.txt``: line 1 the count; line 2 the 10 names, single spaces, no
  trailing space; rows are the file name, one space, then ``"%5d"`` per value:
  ``"000001.jpg    69  109  106  113   77  142   73  152  108  154"`` (4 spaces before the first
  value: a public reader of the official file collapses runs of 4, 3 and 2 spaces, and 3-digit
  values sit in 5-wide columns).
* ``identity_CelebA.txt`` and ``list_eval_partition.txt``: ``"000001.jpg 2880"``, no header.
* Line endings are ``"\\n"``. (Some old tools strip ``"\\r\\n"`` from the official files, so a
  parser should accept both; we write the plain Unix form.)

The pictures come from ``fastceleba.faces.render_face``, which says what is drawn and which
attributes are true to the picture.

About ``num_images / 20`` identities. Each picture depends only on (seed, its number, its
identity), so the same ``(num_images, seed)`` gives byte-identical files whatever the worker count.
The attribute and landmark names and the file names come from ``fastceleba.celeba``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .celeba import (  # the official names and file names live with the parsers
    ATTR_FILE, ATTR_NAMES, IDENTITY_FILE, IMAGE_DIR, LANDMARK_NAMES, LANDMARKS_FILE, PARTITION_FILE,
)
from .errors import DataError
from .faces import render_face
from .files import atomic_write

JPEG_QUALITY = 90
IMAGES_PER_IDENTITY = 20

_NAME_RE = re.compile(r"^\d{6}\.jpg$")


def num_identities(num_images: int) -> int:
    """How many identities a set of ``num_images`` pictures uses (about one per 20 images)."""
    return max(1, round(num_images / IMAGES_PER_IDENTITY))


def partition_counts(num_images: int, partition: Sequence[float]) -> tuple[int, int, int]:
    """(train, valid, test) sizes for contiguous blocks in file order, as the official split."""
    fracs = [float(f) for f in partition]
    if len(fracs) != 3 or any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise DataError(f"partition {tuple(partition)} is not 3 non-negative fractions summing to 1; "
                        "pass e.g. (0.8, 0.1, 0.1)")
    n_train = round(num_images * fracs[0])
    n_valid = min(round(num_images * fracs[1]), num_images - n_train)
    return n_train, n_valid, num_images - n_train - n_valid


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _name(number: int) -> str:
    return f"{number:06d}.jpg"


def _render_chunk(args: tuple[int, int, int, int, str]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Render, encode and write pictures start..stop-1 (1-based); return their annotations."""
    seed, identities, start, stop, image_dir = args
    attrs = np.empty((stop - start, len(ATTR_NAMES)), np.int8)
    ident = np.empty(stop - start, np.int32)
    lmk = np.empty((stop - start, len(LANDMARK_NAMES)), np.int16)
    for k, number in enumerate(range(start, stop)):
        face = render_face(number, seed=seed, identities=identities)
        buf = io.BytesIO()
        face.image.save(buf, "JPEG", quality=JPEG_QUALITY)
        atomic_write(Path(image_dir) / _name(number), buf.getvalue(), sync=False)
        attrs[k], ident[k], lmk[k] = face.attrs, face.identity, face.landmarks
    return start, attrs, ident, lmk


def _prepare_image_dir(image_dir: Path, num_images: int, overwrite: bool) -> None:
    if image_dir.exists() and not image_dir.is_dir():
        raise DataError(f"{image_dir} exists and is not a directory; remove it or choose another root")
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = list(os.scandir(image_dir))
    if entries and not overwrite:
        raise DataError(f"{image_dir} already holds {len(entries)} files; pass overwrite=True "
                        "(--overwrite) or choose an empty root")
    # With overwrite, drop numbered pictures (and our leftover temp files) the new set will not
    # rewrite, so the folder never mixes an old, larger set with the new annotations.
    for e in entries:
        leftover = re.fullmatch(r"\.\d{6}\.jpg\.\w+\.tmp", e.name)  # fastceleba.files' temp names
        if e.is_file() and (leftover or _NAME_RE.match(e.name) and int(e.name[:6]) > num_images):
            os.remove(e.path)


def _text_files(num_images: int, partition: Sequence[float], attrs: np.ndarray, ident: np.ndarray,
                lmk: np.ndarray) -> dict[str, str]:
    names = [_name(k) for k in range(1, num_images + 1)]
    n_train, n_valid, _ = partition_counts(num_images, partition)
    split = [0 if k < n_train else 1 if k < n_train + n_valid else 2 for k in range(num_images)]
    return {
        PARTITION_FILE: "".join(f"{nm} {s}\n" for nm, s in zip(names, split)),
        ATTR_FILE: f"{num_images}\n" + " ".join(ATTR_NAMES) + " \n"
        + "".join(nm + "".join(f" {v:2d}" for v in row) + "\n" for nm, row in zip(names, attrs.tolist())),
        IDENTITY_FILE: "".join(f"{nm} {i}\n" for nm, i in zip(names, ident.tolist())),
        LANDMARKS_FILE: f"{num_images}\n" + " ".join(LANDMARK_NAMES) + "\n"
        + "".join(nm + " " + "".join(f"{v:5d}" for v in row) + "\n" for nm, row in zip(names, lmk.tolist())),
    }


def generate(root: str | os.PathLike, num_images: int, seed: int = 0, *,
             partition: Sequence[float] = (0.8, 0.1, 0.1), workers: int | None = None,
             progress: bool = True, overwrite: bool = False) -> Path:
    """Write a synthetic CelebA of ``num_images`` pictures under ``root``; return ``root``.

    Byte-identical output for the same ``(num_images, seed, partition)`` whatever ``workers``
    (default ``os.cpu_count()``). Every file is written to a temporary name and renamed. Raises
    DataError for bad arguments or if ``root/img_align_celeba`` already holds files and
    ``overwrite`` is false.
    """
    if not 1 <= int(num_images) <= 999_999:
        raise DataError(f"num_images={num_images} is out of range; pass 1..999999 (names are 6 digits)")
    if int(seed) < 0:
        raise DataError(f"seed={seed} is negative; pass a seed >= 0")
    num_images, seed = int(num_images), int(seed)
    partition_counts(num_images, partition)  # validate before touching the disk
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers={workers}; pass workers >= 1")

    root = Path(root)
    image_dir = root / IMAGE_DIR
    _prepare_image_dir(image_dir, num_images, overwrite)

    identities = num_identities(num_images)
    chunk = max(16, min(256, -(-num_images // (workers * 8))))  # several chunks per worker
    jobs = [(seed, identities, s, min(s + chunk, num_images + 1), str(image_dir))
            for s in range(1, num_images + 1, chunk)]
    attrs = np.empty((num_images, len(ATTR_NAMES)), np.int8)
    ident = np.empty(num_images, np.int32)
    lmk = np.empty((num_images, len(LANDMARK_NAMES)), np.int16)
    with tqdm(total=num_images, unit="img", desc="synthetic CelebA", disable=not progress) as bar:
        def collect(result):
            start, a, i, m = result
            rows = slice(start - 1, start - 1 + len(i))
            attrs[rows], ident[rows], lmk[rows] = a, i, m
            bar.update(len(i))

        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                collect(_render_chunk(job))
        else:
            # fork where the platform has it: workers start in a blink and need no `__main__`
            # guard in the caller (spawn breaks `python - <<EOF` scripts). They only run numpy
            # and PIL code, never torch or DALI, so threads those hold in the parent are harmless.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                for result in pool.map(_render_chunk, jobs):
                    collect(result)

    for name, text in _text_files(num_images, partition, attrs, ident, lmk).items():
        atomic_write(root / name, text.encode("ascii"))
    return root
