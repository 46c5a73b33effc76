"""Writing a CelebA folder as shards (the format is fastceleba.shards): splits, resumable runs.

``write_shards(src, out, opts)`` reads the folder (fastceleba.celeba), assigns the splits, shuffles
each (seeded) and cuts it into shards, encodes them in a pool of processes and writes each tar, its
DALI index and a record of it atomically; the manifest is written last. An interrupted run resumes:
shards whose record matches the inputs' fingerprint (annotation hashes, options, image list and
sizes) are kept. What it must not do: leave anything half-written under a final name, or keep
shards made from other inputs.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from . import __version__
from .celeba import ATTR_NAMES, LANDMARK_NAMES, SPLITS, CelebA, load_celeba
from .errors import DataError
from .files import atomic_write
from .shards import (FORMAT, FORMAT_VERSION, MANIFEST, OUR_FILE, PARTIAL_DIR, RAW_MEMBER, TAR_BLOCK, check_jpeg,
                     file_sha256, keys_file, sha256_hex)
from .transforms import resize_crop_array


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


def _fingerprint(obj) -> str:
    return sha256_hex(json.dumps(obj, sort_keys=True).encode())


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


def _decode(path: Path, data: bytes, pixels: bool) -> np.ndarray | None:
    """Check one JPEG, and decode it when its pixels are needed; DataError when it is bad.

    simplejpeg (libjpeg-turbo) strictly, so truncation and corruption show: at full size when the
    pixels are needed (the very pixels PIL decodes, in a quarter of PIL's time here), else at 1/8
    scale (shards.check_jpeg). The size is checked against PIL's decompression-bomb limit first."""
    try:
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        limit = Image.MAX_IMAGE_PIXELS  # None: the user turned the check off
        if limit is not None and h * w > 2 * limit:
            raise Image.DecompressionBombError(f"{w}x{h} pixels is over twice PIL's MAX_IMAGE_PIXELS")
        if not pixels:
            check_jpeg(data)
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except (ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable JPEG ({e}); replace the file, or pass --skip-bad "
                        "to leave it out (it is listed in the manifest)") from None


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info.tobuf(tarfile.USTAR_FORMAT)


_HEADER = _tarfile_header("-", 0)
_HEADER_SUM = sum(_HEADER[1:124]) + sum(_HEADER[136:148]) + 8 * ord(" ") + sum(_HEADER[156:])


def ustar_header(name: str, size: int) -> bytes:
    """tarfile's USTAR header of a regular file of mode 0444, mtime, uid and gid 0, byte for byte,
    in 1.6 us instead of tarfile's 25 (7 members an image). Between members only the name, the
    size and the checksum change."""
    if not name.isascii() or len(name) > 100 or size >= 8 ** 11:
        return _tarfile_header(name, size)  # its encoding, the prefix field, its error
    raw = name.encode("ascii")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _HEADER[100:124], size_field, _HEADER[136:148],
                     b"%06o\0 " % checksum, _HEADER[156:]))


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
            name = f"{key}.{ext}"
            pad = -len(payload) % TAR_BLOCK
            self.chunks += [ustar_header(name, len(payload)), payload, bytes(pad)]
            row.append(f"{ext} {self.offset + TAR_BLOCK} {len(payload)} {name}")
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


def _read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as e:
        return e


def _members(path: Path, data: bytes | OSError, sample: dict, opts: ShardOptions) -> list[tuple[str, bytes]]:
    """Check and convert one image (its bytes, or the error reading them) into its members;
    DataError when the image is bad."""
    if isinstance(data, OSError):
        raise DataError(f"{path}: unreadable ({data}); replace the file, or pass --skip-bad to leave it "
                        "out (it is listed in the manifest)")
    arr = _decode(path, data, pixels=bool(opts.size))
    members = []
    if opts.jpeg:
        members.append(("jpg", data))
    if opts.size:
        try:
            raw = resize_crop_array(Image.fromarray(arr), opts.size, opts.crop)
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
    paths = [image_dir / name for name in job["samples"]["file"]]
    # Read-ahead threads: from a cold disk, each small file's read latency would otherwise leave the
    # core idle (a full-size run got 144 % of 2 cores without them).
    with ThreadPoolExecutor(4) as reader:
        for path, data, sample in zip(paths, reader.map(_read, paths), _samples(job["samples"])):
            try:
                members = _members(path, data, sample, opts)
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
              "bytes": len(data), "sha256": sha256_hex(data), "index_sha256": sha256_hex(index),
              "fingerprint": job["fingerprint"], "keys": keys, "skipped": skipped}
    atomic_write(out / PARTIAL_DIR / f"{job['tar']}.json", json.dumps(record).encode())
    return record


def _columns(ds: CelebA, names: list[str], split: str) -> dict:
    """One shard's samples as columns: quick to build and to send to a worker (a full-size CelebA's
    202,599 per-sample dicts took ~11 s of the parent's time before the first image was read)."""
    def stack(table):
        return None if table is None else np.stack([table[n] for n in names])

    return {"split": split, "file": names, "num": [ds.number[n] for n in names], "attr": stack(ds.attrs),
            "ident": None if ds.identity is None else [ds.identity[n] for n in names],
            "lmk": stack(ds.landmarks)}


def _samples(columns: dict):
    """The samples of ``_columns``, one dict each (built in the worker)."""
    for i, name in enumerate(columns["file"]):
        sample = {"file": name, "num": columns["num"][i]}
        info = {"file": name, "split": columns["split"], "num": sample["num"]}
        if columns["attr"] is not None:
            sample["attr"] = columns["attr"][i].tolist()
            info["attrs"] = dict(zip(ATTR_NAMES, sample["attr"]))
        if columns["ident"] is not None:
            sample["ident"] = info["identity"] = columns["ident"][i]
        if columns["lmk"] is not None:
            sample["lmk"] = columns["lmk"][i].tolist()
            info["landmarks"] = dict(zip(LANDMARK_NAMES, sample["lmk"]))
        sample["info"] = info
        yield sample


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
    images = sha256_hex("\n".join(ds.images).encode())  # sizes go into each shard's fingerprint
    return {"format": FORMAT_VERSION, "source": str(ds.root), "options": opts.as_dict(),
            "images": images,
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
        if any(n.endswith("keys.txt") and OUR_FILE.fullmatch(n) for n in names):
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
                         "samples": _columns(ds, chunk, split)})
    total = sum(len(j["samples"]["file"]) for j in jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with tqdm(total=total, unit="img", desc="sharding", disable=not progress) as bar:
        if workers == 1:
            results = map(_encode_shard, jobs)
            for job, record in zip(jobs, results):
                records[record["tar"]] = record
                bar.update(len(job["samples"]["file"]))
        else:
            with ProcessPoolExecutor(workers, initializer=_watch_parent, initargs=(os.getpid(),)) as pool:
                for job, record in zip(jobs, pool.map(_encode_shard, jobs)):
                    records[record["tar"]] = record
                    bar.update(len(job["samples"]["file"]))
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
        # webdataset keys (the image stems): what `sample["__key__"]` is for a reader of the tars
        atomic_write(out / keys_file(split), "".join(k.rsplit(".", 1)[0] + "\n" for k in keys).encode())
        splits[split] = {"num_samples": len(keys), "keys": keys_file(split),
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

