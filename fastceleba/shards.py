"""The shard format: writing a CelebA folder as WebDataset tars, verifying, and finding them again.

A shard directory holds, per split, ``{split}-NNNNN.tar`` with a DALI index ``.idx`` beside it,
``{split}.keys.txt`` (the image names in shard order) and one ``manifest.json``. Each sample is
stored under the image stem with these members (each only when available):

    jpg    the original JPEG bytes, verbatim
    rgb8   size x size x 3 uint8 (HWC) from fastceleba.transforms.resize_crop   (--size N)
           (format v1 called it ``rgb``, which webdataset's decoders take for an SGI image)
    num    int32: the CelebA file number, 000123.jpg -> 123
    attr   int8[40], -1/+1 in official order;  ident  int32;  lmk  int16[10]   (little-endian)
    json   the same labels, for humans

Binary members are fixed-size little-endian so DALI reads them as dense tensors. Tars are
byte-reproducible: plain USTAR headers with mtime 0, uid/gid 0 and a fixed member order.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from . import __version__
from .celeba import ATTR_NAMES, LANDMARK_NAMES, SPLITS, CelebA, load_celeba
from .errors import DataError
from .files import atomic_write
from .transforms import resize_crop_array

FORMAT = "fastceleba-shards"
FORMAT_VERSION = 2  # v2: the raw image member is .rgb8 (v1: .rgb); index checksums; file-number num
READ_VERSIONS = (1, 2)  # manifests this version reads
RAW_MEMBER = "rgb8"  # size x size x 3 uint8: a name webdataset's decoders leave as bytes
LEGACY_RAW_MEMBER = "rgb"  # the v1 name
MANIFEST = "manifest.json"
PARTIAL_DIR = ".partial"  # per-shard records of an unfinished run, for resuming
TAR_BLOCK = 512
# The files a run writes into OUT (so a later run may remove them, and only them).
OUR_FILE = re.compile(r"(?:train|valid|test)(?:-\d{5}\.(?:tar|idx)|\.keys\.txt)")


# ---------------------------------------------------------------------------------------------
# Reading: what loaders and tools use to find the shards.

def load_manifest(root: Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if (root / PARTIAL_DIR).is_dir():
            hint = "an unfinished run: re-run tools/shard.py with the same arguments to finish it"
        elif root.is_dir() and any(OUR_FILE.fullmatch(p.name) for p in root.iterdir()):
            hint = (f"the shards there lost it; `python tools/shard.py CELEBA_DIR {root}` (with the "
                    "options you used) makes them again")
        else:
            hint = f"make shards with `python tools/shard.py CELEBA_DIR {root}`"
        raise DataError(f"{path}: no such file; {hint}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e}); re-run tools/shard.py into an empty directory") from None
    return parse_manifest(data, str(path))


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest's JSON (read from a file or a URL), checked to be ours, in the current version's
    terms (``raw_member`` filled in for v1)."""
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise DataError(f"{where}: not JSON ({e}); re-run tools/shard.py into an empty directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") not in READ_VERSIONS:
        raise DataError(f"{where}: not a {FORMAT} v{FORMAT_VERSION} manifest; re-make the shards "
                        "with this version of tools/shard.py")
    if "raw_member" not in manifest:  # v1
        manifest["raw_member"] = LEGACY_RAW_MEMBER if LEGACY_RAW_MEMBER in manifest["members"] else None
    return manifest


def raw_member(manifest: dict) -> str | None:
    """The tar extension of the raw size x size x 3 image member (``rgb8``; ``rgb`` in v1
    shards), or None when the shards carry none."""
    return manifest.get("raw_member")


def _split_entry(root: Path, split: str, manifest: dict | None) -> tuple[dict, dict]:
    manifest = manifest or load_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{Path(root) / MANIFEST}: no split {split!r}; choose one of "
                        f"{', '.join(manifest['splits'])}")
    return manifest, manifest["splits"][split]


def shard_paths(root: Path, split: str, manifest: dict | None = None) -> list[tuple[Path, Path]]:
    """(tar, idx) of every shard of a split, checked to exist with the recorded size."""
    root = Path(root)
    _, entry = _split_entry(root, split, manifest)
    out = []
    for shard in entry["shards"]:
        tar, idx = root / shard["tar"], root / shard["index"]
        for path in (tar, idx):
            if not path.is_file():
                raise DataError(f"{path}: missing; re-run tools/shard.py with the same arguments "
                                "to restore it")
        if tar.stat().st_size != shard["bytes"]:
            raise DataError(f"{tar}: {tar.stat().st_size} bytes but the manifest says {shard['bytes']} "
                            "(truncated or replaced); re-run tools/shard.py with the same arguments")
        out.append((tar, idx))
    return out


def split_keys(root: Path, split: str, manifest: dict | None = None) -> list[str]:
    """Image file names of a split, in shard order."""
    root = Path(root)
    _, entry = _split_entry(root, split, manifest)
    path = root / entry["keys"]
    if not path.is_file():
        raise DataError(f"{path}: missing; re-run tools/shard.py with the same arguments")
    return path.read_text().split()


def check_checksums(root: Path, split: str, manifest: dict | None = None) -> None:
    """Compare every tar of a split and its DALI index with the manifest (sha256; v1 manifests
    record no index checksum, so the index is compared with one made from the tar). Raises a
    DataError naming the first file that differs; the loaders' ``verify=True`` calls this."""
    root = Path(root)
    manifest, entry = _split_entry(root, split, manifest)
    fix = "delete it and re-run tools/shard.py with the same arguments"
    for shard, (tar, idx) in zip(entry["shards"], shard_paths(root, split, manifest)):
        if file_sha256(tar) != shard["sha256"]:
            raise DataError(f"{tar}: sha256 does not match the manifest (corrupt or replaced); {fix}")
        if "index_sha256" in shard:  # streamed: no tar in memory
            if file_sha256(idx) != shard["index_sha256"]:
                raise DataError(f"{idx}: sha256 does not match the manifest (a sample duplicated, "
                                f"missing or moved, so DALI would read the wrong data); {fix}")
        else:
            problem = _index_problem(idx, tar.read_bytes(), shard)
            if problem:
                raise DataError(problem)


def _index_problem(idx: Path, tar_data: bytes, shard: dict) -> str | None:
    """Why the index ``idx`` is not the one of ``tar_data`` (None when it is)."""
    fix = "delete it and re-run tools/shard.py with the same arguments"
    if not idx.is_file():
        return f"{idx}: missing; {fix}"
    text = idx.read_bytes()
    if "index_sha256" in shard and _sha256(text) != shard["index_sha256"]:
        return (f"{idx}: sha256 does not match the manifest (a sample duplicated, missing or "
                f"moved, so DALI would read the wrong data); {fix}")
    if text != index_of(tar_data).encode():
        return f"{idx}: does not match {Path(shard['tar']).name}; {fix}"
    return None


# ---------------------------------------------------------------------------------------------
# Writing.

@dataclass(frozen=True)
class ShardOptions:
    size: int | None = None        # also store size x size raw RGB
    crop: int | None = None        # centre crop before resizing, for the raw RGB member
    jpeg: bool = True              # store the original JPEG bytes
    shard_size: int = 5000         # samples per shard
    shard_bytes: int | None = None  # or: cut shards by (approximate) size in bytes
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # only without list_eval_partition.txt
    seed: int = 0
    skip_bad: bool = False

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(obj) -> str:
    return _sha256(json.dumps(obj, sort_keys=True).encode())


def assign_splits(ds: CelebA, opts: ShardOptions) -> dict[str, list[str]]:
    """Images of each split, shuffled (seeded) so DALI's small shuffle buffer sees mixed data."""
    if ds.partition is not None:
        groups = {s: [n for n in ds.images if ds.partition[n] == i] for i, s in enumerate(SPLITS)}
    else:
        if len(opts.split) != 3 or any(f < 0 for f in opts.split) or abs(sum(opts.split) - 1) > 1e-6:
            raise DataError(f"--split {opts.split}: give three fractions train,valid,test summing to 1")
        order = np.random.default_rng(opts.seed).permutation(len(ds.images))
        n_train = int(round(opts.split[0] * len(order)))
        n_valid = int(round(opts.split[1] * len(order)))
        cut = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
               "test": order[n_train + n_valid:]}
        groups = {s: [ds.images[i] for i in sorted(idx)] for s, idx in cut.items()}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([opts.seed, i])
        groups[split] = [groups[split][j] for j in rng.permutation(len(groups[split]))]
    return groups


def cut_shards(names: list[str], image_dir: Path, opts: ShardOptions) -> list[list[str]]:
    if opts.shard_bytes is None:
        return [names[i:i + opts.shard_size] for i in range(0, len(names), opts.shard_size)]
    raw = 3 * opts.size * opts.size if opts.size else 0
    shards, current, total = [], [], 0
    for name in names:
        cost = (os.path.getsize(image_dir / name) if opts.jpeg else 0) + raw + 6 * TAR_BLOCK
        if current and total + cost > opts.shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += cost
    return shards + ([current] if current else [])


def _check_image(path: Path, data: bytes) -> None:
    """Fully entropy-decode the JPEG (at 1/8 scale: cheap) so truncation and corruption show."""
    try:
        simplejpeg.decode_jpeg(data, min_factor=8, strict=True)
    except ValueError as e:
        raise DataError(f"{path}: not a readable JPEG ({e}); replace the file, or pass --skip-bad "
                        "to leave it out (it is listed in the manifest)") from None


class TarBuilder:
    """A tar in memory with its DALI index, written member by member.

    Plain USTAR headers (mtime 0, uid/gid 0, mode 0444) make shards byte-reproducible, and knowing
    each member's offset as it is written gives the index without re-reading the tar.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0
        self.rows: list[str] = []

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        row = []
        for ext, payload in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            pad = -len(payload) % TAR_BLOCK
            self.chunks += [info.tobuf(tarfile.USTAR_FORMAT), payload, bytes(pad)]
            row.append(f"{ext} {self.offset + TAR_BLOCK} {len(payload)} {info.name}")
            self.offset += TAR_BLOCK + len(payload) + pad
        self.rows.append(" ".join(row))

    def tar_bytes(self) -> bytes:
        end = 2 * TAR_BLOCK  # two zero blocks, then zeros up to a whole 10 KiB record, as tar does
        end += -(self.offset + end) % tarfile.RECORDSIZE
        return b"".join(self.chunks) + bytes(end)

    def index(self) -> str:
        return f"v1.2 {len(self.rows)}\n" + "".join(r + "\n" for r in self.rows)


# What PIL and the resize can raise on a bad image: all of it is "this image is unreadable".
IMAGE_ERRORS = (DataError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _members(path: Path, sample: dict, opts: ShardOptions) -> list[tuple[str, bytes]]:
    """Read, check and convert one image into its members; DataError when the image is bad."""
    try:
        data = path.read_bytes()
        _check_image(path, data)
    except IMAGE_ERRORS as e:
        raise DataError(str(e) if isinstance(e, DataError) else
                        f"{path}: unreadable ({e}); replace the file, or pass --skip-bad to leave it "
                        "out (it is listed in the manifest)") from None
    members = []
    if opts.jpeg:
        members.append(("jpg", data))
    if opts.size:
        try:
            with Image.open(io.BytesIO(data)) as img:
                raw = resize_crop_array(img, opts.size, opts.crop)
        except IMAGE_ERRORS as e:
            raise DataError(f"{path}: cannot be resized for --size {opts.size} ({type(e).__name__}: "
                            f"{e}); replace the file, or pass --skip-bad to leave it out (it is listed "
                            "in the manifest)") from None
        members.append((RAW_MEMBER, raw.tobytes()))
    members.append(("num", np.int32(sample["num"]).astype("<i4").tobytes()))
    if "attr" in sample:
        members.append(("attr", np.asarray(sample["attr"], np.int8).tobytes()))
    if "ident" in sample:
        members.append(("ident", np.int32(sample["ident"]).astype("<i4").tobytes()))
    if "lmk" in sample:
        members.append(("lmk", np.asarray(sample["lmk"], "<i2").tobytes()))
    members.append(("json", json.dumps(sample["info"], sort_keys=True).encode()))
    return members


def _encode_shard(job: dict) -> dict:
    """Build one tar in memory and write it (and its index) under temporary names, then rename."""
    opts: ShardOptions = job["opts"]
    image_dir, out = Path(job["image_dir"]), Path(job["out"])
    builder = TarBuilder()
    keys, skipped = [], []
    for sample in job["samples"]:
        try:
            members = _members(image_dir / sample["file"], sample, opts)
        except DataError as e:
            if not opts.skip_bad:
                raise
            skipped.append({"file": sample["file"], "reason": str(e)})
            continue
        builder.add_sample(sample["file"].split(".")[0], members)
        keys.append(sample["file"])
    tar_path, idx_path = out / job["tar"], out / job["index"]
    if not keys:
        raise DataError(f"{tar_path}: every image of this shard was skipped as unreadable; "
                        f"check {image_dir}")
    data, index = builder.tar_bytes(), builder.index().encode()
    # The index first, then the tar: a tar that exists under its final name is always complete.
    atomic_write(idx_path, index)
    atomic_write(tar_path, data)
    record = {"tar": job["tar"], "index": job["index"], "num_samples": len(keys),
              "bytes": len(data), "sha256": _sha256(data), "index_sha256": _sha256(index),
              "fingerprint": job["fingerprint"], "keys": keys, "skipped": skipped}
    atomic_write(out / PARTIAL_DIR / f"{job['tar']}.json", json.dumps(record).encode())
    return record


def _sample(ds: CelebA, name: str, split: str) -> dict:
    sample = {"file": name, "num": ds.number[name]}
    info = {"file": name, "split": split, "num": ds.number[name]}
    if ds.attrs is not None:
        sample["attr"] = ds.attrs[name].tolist()
        info["attrs"] = dict(zip(ATTR_NAMES, sample["attr"]))
    if ds.identity is not None:
        sample["ident"] = info["identity"] = ds.identity[name]
    if ds.landmarks is not None:
        sample["lmk"] = ds.landmarks[name].tolist()
        info["landmarks"] = dict(zip(LANDMARK_NAMES, sample["lmk"]))
    sample["info"] = info
    return sample


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reusable(out: Path, record_path: Path, fingerprint: str) -> dict | None:
    """A shard finished by an earlier run with the same inputs, still intact."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    tar, idx = out / record["tar"], out / record["index"]
    if record.get("fingerprint") != fingerprint or not tar.is_file() or not idx.is_file():
        return None
    if tar.stat().st_size != record["bytes"] or file_sha256(tar) != record["sha256"] \
            or file_sha256(idx) != record.get("index_sha256"):
        return None
    return record


def _inputs(ds: CelebA, opts: ShardOptions) -> dict:
    """Everything that shapes a shard: a change in any of it makes finished shards stale."""
    images = hashlib.sha256("\n".join(ds.images).encode())  # sizes go into each shard's fingerprint
    return {"format": FORMAT_VERSION, "source": str(ds.root), "options": opts.as_dict(),
            "images": images.hexdigest(),
            "annotations": {k: [str(p), file_sha256(p)] if p else None for k, p in ds.sources.items()}}


def _changed(previous: dict | None, current: dict) -> str:
    """What differs between two runs' inputs, in words."""
    if not previous:
        return "input or options"
    what = [k for k in ("format", "source", "options", "images") if previous.get(k) != current.get(k)]
    old, new = previous.get("annotations") or {}, current["annotations"]
    what += [Path((new.get(k) or old.get(k))[0]).name for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    return ", ".join(what) or "input or options"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _remove_ours(out: Path) -> None:
    """Delete what our runs write into OUT (shards, indexes, key lists, resume state, temp files)."""
    for p in out.iterdir():
        if p.is_file() and (OUR_FILE.fullmatch(p.name) or _is_temp(p.name)):
            p.unlink()
    partial = out / PARTIAL_DIR
    if partial.is_dir():
        for p in partial.iterdir():
            p.unlink()
        partial.rmdir()


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # fastceleba.files.atomic_path's names


def _prepare_out(out: Path, run_id: str, inputs: dict, log) -> None:
    """Refuse to mix our shards with another run's; resume our own; start over after a run that
    cannot be finished (other inputs, or its manifest deleted); remove a dead run's temp files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a directory; give OUT a directory path (new or empty)")
    if not out.is_dir():
        return
    partial_run = out / PARTIAL_DIR / "run.json"
    if (out / MANIFEST).is_file():
        previous = _read_json(out / MANIFEST)
        if previous.get("run_id") != run_id:
            raise DataError(f"{out}: holds finished shards of other {_changed(previous.get('inputs'), inputs)}; "
                            f"choose another OUT, or delete them (`rm -r {out}`) and re-run")
    elif partial_run.is_file():
        previous = _read_json(partial_run)
        if previous.get("run_id") != run_id:
            log(f"{out}: an unfinished run of other {_changed(previous.get('inputs'), inputs)} was "
                "here; its shards are stale, starting over")
            _remove_ours(out)
    else:
        names = [p.name for p in out.iterdir()]
        foreign = [n for n in names if n.endswith((".tar", ".idx")) and not OUR_FILE.fullmatch(n)]
        if foreign:
            raise DataError(f"{out}: already holds tar shards not made by tools/shard.py ({foreign[0]}); "
                            "choose an empty directory")
        if any(n.endswith(".keys.txt") and OUR_FILE.fullmatch(n) for n in names):
            log(f"{out}: shards without {MANIFEST} (deleted?); making them again")
            _remove_ours(out)
        elif any(OUR_FILE.fullmatch(n) for n in names):
            raise DataError(f"{out}: holds shard files but no {MANIFEST} or resume state; delete them "
                            f"(`rm -r {out}`) and re-run")
    for folder in (out, out / PARTIAL_DIR):  # temp files of a run that was killed
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_temp(p.name) and p.is_file():
                    p.unlink()


def os_error_line(e: OSError, out: Path) -> str:
    """One line for an OSError met while writing OUT: the path and the fix."""
    path = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{path}: no space left on the device; free some space or choose another OUT, then "
                "re-run the same command (finished shards are kept)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: not writable ({e.strerror}); choose a writable OUT or fix its permissions"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file is in the way of a directory ({e.strerror}); give OUT a directory path"
    return f"{path}: {e.strerror or e}; check the path and re-run the same command"


def _watch_parent(parent: int) -> None:
    """Pool-worker initializer: exit when the parent dies (kill -9 runs no cleanup, and a forked
    worker would otherwise wait on its task queue forever)."""
    def watch():
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_shards(src: Path, out: Path, opts: ShardOptions = ShardOptions(), *,
                 workers: int | None = None, progress: bool = True, log=_stderr) -> dict:
    """Shard the CelebA root ``src`` into ``out``; resumes an interrupted run of the same command.

    ``log`` gets the lines a user must see: which annotation files were used, warnings, and
    why a run starts over."""
    if opts.size is not None and opts.size <= 0 or opts.crop is not None and opts.crop <= 0:
        raise DataError("--size and --crop must be positive")
    if not opts.jpeg and not opts.size:
        raise DataError("--no-jpeg needs --size N: a shard must hold some image")
    if opts.shard_size <= 0 or opts.shard_bytes is not None and opts.shard_bytes <= 0:
        raise DataError("--shard-size and --shard-bytes must be positive")
    ds = load_celeba(src)
    out = Path(out).resolve()
    for inside in (ds.root, ds.image_dir):
        if out == inside or inside in out.parents:
            raise DataError(f"{out}: is inside the CelebA folder {inside}; choose an OUT outside it "
                            f"(e.g. {ds.root.parent / 'shards'})")
    for line in ds.describe():
        log(line)
    for line in ds.warnings:
        log(f"warning: {line}")
    try:
        return _write(ds, out, opts, workers, progress, log)
    except OSError as e:
        raise DataError(os_error_line(e, out)) from None


def _write(ds: CelebA, out: Path, opts: ShardOptions, workers: int | None, progress: bool, log) -> dict:
    from tqdm import tqdm

    inputs = _inputs(ds, opts)
    run_id = _fingerprint(inputs)
    _prepare_out(out, run_id, inputs, log)
    (out / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(out / PARTIAL_DIR / "run.json", json.dumps({"run_id": run_id, "inputs": inputs}).encode())

    jobs, records = [], {}
    for split, names in assign_splits(ds, opts).items():
        for i, chunk in enumerate(cut_shards(names, ds.image_dir, opts)):
            tar = f"{split}-{i:05d}.tar"
            # A replaced image (its size, in practice) makes only its own shard stale.
            fingerprint = _fingerprint([run_id, [(n, os.path.getsize(ds.image_dir / n)) for n in chunk]])
            reused = _reusable(out, out / PARTIAL_DIR / f"{tar}.json", fingerprint)
            if reused is not None:
                records[tar] = reused
                continue
            jobs.append({"opts": opts, "image_dir": str(ds.image_dir), "out": str(out),
                         "tar": tar, "index": f"{split}-{i:05d}.idx", "fingerprint": fingerprint,
                         "samples": [_sample(ds, n, split) for n in chunk]})
    total = sum(len(j["samples"]) for j in jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with tqdm(total=total, unit="img", desc="sharding", disable=not progress) as bar:
        if workers == 1:
            results = map(_encode_shard, jobs)
            for job, record in zip(jobs, results):
                records[record["tar"]] = record
                bar.update(len(job["samples"]))
        else:
            with ProcessPoolExecutor(workers, initializer=_watch_parent, initargs=(os.getpid(),)) as pool:
                for job, record in zip(jobs, pool.map(_encode_shard, jobs)):
                    records[record["tar"]] = record
                    bar.update(len(job["samples"]))
    return _finish(ds, out, opts, run_id, inputs, records)


def _finish(ds: CelebA, out: Path, opts: ShardOptions, run_id: str, inputs: dict, records: dict) -> dict:
    members = {}
    if opts.jpeg:
        members["jpg"] = {"dtype": "bytes"}
    if opts.size:
        members[RAW_MEMBER] = {"dtype": "uint8", "shape": [opts.size, opts.size, 3]}
    members["num"] = {"dtype": "int32", "shape": [1]}
    if ds.attrs is not None:
        members["attr"] = {"dtype": "int8", "shape": [len(ATTR_NAMES)]}
    if ds.identity is not None:
        members["ident"] = {"dtype": "int32", "shape": [1]}
    if ds.landmarks is not None:
        members["lmk"] = {"dtype": "int16", "shape": [len(LANDMARK_NAMES)]}
    members["json"] = {"dtype": "json"}
    splits, skipped = {}, []
    for split in SPLITS:
        shards = [records[t] for t in sorted(records) if t.startswith(split + "-")]
        keys = [k for s in shards for k in s["keys"]]
        atomic_write(out / f"{split}.keys.txt", "".join(k + "\n" for k in keys).encode())
        splits[split] = {"num_samples": len(keys), "keys": f"{split}.keys.txt",
                         "shards": [{k: s[k] for k in ("tar", "index", "num_samples", "bytes", "sha256",
                                                       "index_sha256")} for s in shards]}
        skipped += [x for s in shards for x in s["skipped"]]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
        "run_id": run_id, "inputs": inputs, "source": str(ds.root), "image_dir": str(ds.image_dir),
        # as seen from OUT too: another node (or a moved copy) finds the images where it keeps
        # shards and folder side by side, at whatever absolute path
        "image_dir_relative": os.path.relpath(ds.image_dir.resolve(), out.resolve()),
        "annotations": {k: str(p) if p else None for k, p in ds.sources.items()},
        "options": opts.as_dict(), "size": opts.size, "crop": opts.crop if opts.size else None,
        "members": members, "raw_member": RAW_MEMBER if opts.size else None,
        "attr_names": ATTR_NAMES if ds.attrs is not None else None,
        "landmark_names": LANDMARK_NAMES if ds.landmarks is not None else None,
        "splits": splits, "skipped": sorted(skipped, key=lambda x: x["file"]),
    }
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    for path in (out / PARTIAL_DIR).iterdir():
        path.unlink()
    (out / PARTIAL_DIR).rmdir()
    return manifest


# ---------------------------------------------------------------------------------------------
# Verifying.

def verify(root: Path, progress: bool = True) -> list[str]:
    """Re-read every shard; return one line per problem (empty when all holds)."""
    from tqdm import tqdm

    root = Path(root)
    manifest = load_manifest(root)
    members = manifest["members"]
    problems = []
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    bar = tqdm(total=total, unit="img", desc="verifying", disable=not progress)
    for split, entry in manifest["splits"].items():
        try:
            expected_keys = split_keys(root, split, manifest)
        except DataError as e:
            problems.append(str(e))
            expected_keys = None
        keys = []
        for shard in entry["shards"]:
            tar = root / shard["tar"]
            if not tar.is_file():
                problems.append(f"{tar}: missing; re-run tools/shard.py with the same arguments")
                continue
            data = tar.read_bytes()
            if len(data) != shard["bytes"] or _sha256(data) != shard["sha256"]:
                problems.append(f"{tar}: checksum does not match the manifest (corrupt or truncated); "
                                "delete it and re-run tools/shard.py with the same arguments")
                continue
            problem = _index_problem(root / shard["index"], data, shard)
            if problem:
                problems.append(problem)
            shard_keys, shard_problems = _check_samples(tar, data, members)
            problems += shard_problems
            if len(shard_keys) != shard["num_samples"]:
                problems.append(f"{tar}: {len(shard_keys)} samples, manifest says {shard['num_samples']}")
            keys += shard_keys
            bar.update(len(shard_keys))
        if expected_keys is not None and [k.split(".")[0] for k in expected_keys] != keys:
            problems.append(f"{root / entry['keys']}: does not list the samples of the {split} shards")
        if len(keys) != entry["num_samples"]:
            problems.append(f"{root / MANIFEST}: split {split} has {len(keys)} samples, "
                            f"manifest says {entry['num_samples']}")
    bar.close()
    return problems


def _samples(data: bytes):
    """(key, {ext: bytes}) per sample, in tar order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        key, sample = None, {}
        for member in tar:
            k, ext = member.name.split(".", 1)
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, sample


def _check_samples(tar: Path, data: bytes, members: dict) -> tuple[list[str], list[str]]:
    keys, problems = [], []
    for key, sample in _samples(data):
        keys.append(key)
        if set(sample) != set(members):
            problems.append(f"{tar}: sample {key} has members {sorted(sample)}, expected {sorted(members)}")
            continue
        for ext, spec in members.items():
            if "shape" in spec:
                want = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
                if len(sample[ext]) != want:
                    problems.append(f"{tar}: {key}.{ext} has {len(sample[ext])} bytes, expected {want}")
        if "jpg" in sample:
            try:
                simplejpeg.decode_jpeg(sample["jpg"], strict=True)
            except ValueError as e:
                problems.append(f"{tar}: {key}.jpg does not decode ({e})")
    return keys, problems


def read_index(idx: Path, num_samples: int) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI index (v1.1 or v1.2): per sample, {ext: (data offset, size)} in tar order."""
    lines = Path(idx).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] not in ("v1.1", "v1.2") or int(head[1]) != num_samples \
            or len(lines) - 1 != num_samples:
        raise DataError(f"{idx}: not an index of {num_samples} samples; delete it and re-run "
                        "tools/shard.py with the same arguments")
    width = 4 if head[0] == "v1.2" else 3  # v1.2 adds the member name
    samples = []
    for line in lines[1:]:
        toks = line.split()
        samples.append({toks[i]: (int(toks[i + 1]), int(toks[i + 2])) for i in range(0, len(toks), width)})
    return samples


def index_of(data: bytes) -> str:
    """The DALI index (wds2idx's v1.2 format) of a tar held in memory."""
    rows, current, key = [], [], None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = member.name.split(".", 1)
            if k != key and current:
                rows.append(" ".join(current))
                current = []
            key = k
            current.append(f"{ext} {member.offset_data} {member.size} {member.name}")
    if current:
        rows.append(" ".join(current))
    return f"v1.2 {len(rows)}\n" + "".join(r + "\n" for r in rows)
