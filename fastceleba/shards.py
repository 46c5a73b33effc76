"""The shard format: finding, reading and verifying the WebDataset tars (fastceleba.shardwriter writes them).

A shard directory holds, per split, ``{split}-NNNNN.tar`` with a DALI index ``.idx`` beside it,
``{split}set-keys.txt`` (the samples' webdataset keys, ``000123``, in shard order) and one ``manifest.json``.
Format v2 called the keys file ``{split}.keys.txt`` and listed image file names (``000123.jpg``); that
name made Hugging Face ``datasets.load_dataset(DIR)`` take it for a text data file of the split. Each sample is
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

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import simplejpeg

from .errors import DataError

FORMAT = "fastceleba-shards"
FORMAT_VERSION = 3  # v3: {split}set-keys.txt of keys; v2: the raw member is .rgb8 (v1: .rgb), index checksums
READ_VERSIONS = (1, 2, 3)  # manifests this version reads
RAW_MEMBER = "rgb8"  # size x size x 3 uint8: a name webdataset's decoders leave as bytes
LEGACY_RAW_MEMBER = "rgb"  # the v1 name
MANIFEST = "manifest.json"
PARTIAL_DIR = ".partial"  # per-shard records of an unfinished run, for resuming
TAR_BLOCK = 512
# The files a run writes into OUT (so a later run may remove them, and only them).
OUR_FILE = re.compile(r"(?:train|valid|test)(?:-\d{5}\.(?:tar|idx)|set-keys\.txt|\.keys\.txt)")


def keys_file(split: str) -> str:
    """The keys file's name: the split word is followed by no separator, so Hugging Face datasets' split
    patterns (``train[-._ 0-9]*``, ...) do not take it for a data file of the split."""
    return f"{split}set-keys.txt"


def image_names(text: str, manifest: dict) -> list[str]:
    """A keys file's text as image file names (v3 lists keys, ``000123``; v1/v2 names, ``000123.jpg``)."""
    lines = text.split()
    return [k + ".jpg" for k in lines] if manifest.get("format_version", 0) >= 3 else lines


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
    manifest, entry = _split_entry(root, split, manifest)
    path = root / entry["keys"]
    if not path.is_file():
        raise DataError(f"{path}: missing; re-run tools/shard.py with the same arguments")
    return image_names(path.read_text(), manifest)


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
    if "index_sha256" in shard and sha256_hex(text) != shard["index_sha256"]:
        return (f"{idx}: sha256 does not match the manifest (a sample duplicated, missing or "
                f"moved, so DALI would read the wrong data); {fix}")
    if text != index_of(tar_data).encode():
        return f"{idx}: does not match {Path(shard['tar']).name}; {fix}"
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            if len(data) != shard["bytes"] or sha256_hex(data) != shard["sha256"]:
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
                check_jpeg(sample["jpg"])
            except ValueError as e:
                problems.append(f"{tar}: {key}.jpg does not decode ({e})")
    return keys, problems


def check_jpeg(data: bytes) -> None:
    """ValueError unless the JPEG entropy-decodes cleanly to its end (libjpeg's warnings count).

    Decoded at 1/8 scale: all of the entropy decoding, which is where truncation and corruption
    show, but little of the IDCT and colour conversion (122 against 180 us for a 178x218 face)."""
    simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)


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
