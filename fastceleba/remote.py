"""Shards somewhere else: an http(s) URL or a webdataset ``pipe:`` command instead of a directory.

What this module holds: telling a remote shard location from a local directory (``location``,
``RemoteDir``), reading its small files (``read_bytes``, ``read_manifest``, ``split_keys``),
opening one file for reading (``open_source``), copying one file to local disk atomically with its
size and sha256 checked (``fetch``), and ``stage``: a whole shard directory, or some of its splits,
copied to local disk (what tools/stage.py runs).

A shard location (``--data``, ``make_loader(data=...)``) is one of

* a local directory written by tools/shard.py;
* ``http://host/shards/`` or ``https://...``: the directory's files are ``URL/NAME``;
* ``pipe:CMD`` where CMD holds ``{name}`` and writes that file to stdout, webdataset's way to
  object stores: ``pipe:aws s3 cp s3://bucket/shards/{name} -``, ``pipe:gsutil cat gs://b/s/{name}``.

The ``wds`` loader streams tars from such a location through webdataset's own opener (curl for
http(s), a shell for ``pipe:``). Streaming cannot check sha256 (that needs the whole file first);
it checks each shard's sample count against the manifest instead. Everything else needs local
files: ``stage`` copies them and checks every byte.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shlex
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from . import shards
from .errors import DataError
from .files import atomic_path, atomic_write
from .shards import MANIFEST, file_sha256, index_of

TIMEOUT = 60  # seconds without a byte before an http read gives up
OBJECT_STORES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "ais://", "ftp://", "sftp://")


def is_remote(data) -> bool:
    """True for an http(s) URL or a ``pipe:`` command (anything but a local path)."""
    return isinstance(data, str) and data.startswith(("http://", "https://", "pipe:"))


class RemoteDir(str):
    """A remote shard directory, kept as the string the user gave (a slash is added to a URL).
    ``remote / name`` is the URL, or the pipe command with ``{name}`` filled in, of one file."""

    def __new__(cls, data: str):
        data = str(data)
        if data.startswith("pipe:"):
            if "{name}" not in data:
                raise DataError(f"{data}: a pipe: location needs {{name}} where each file name goes, "
                                "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'")
        elif data.startswith(("http://", "https://")):
            data = data if data.endswith("/") else data + "/"
        else:
            raise DataError(f"{data}: not an http(s):// URL or a pipe: command")
        return super().__new__(cls, data)

    def __truediv__(self, name) -> str:
        name = str(name)
        if self.startswith("pipe:"):
            return str.replace(self, "{name}", shlex.quote(name))
        return str(self) + urllib.parse.quote(name)

    def quoted(self) -> str:
        """The location as one shell word, for the commands we print."""
        return shlex.quote(str(self))


def location(data) -> Path | RemoteDir:
    """A local directory as a Path, a URL or pipe as a RemoteDir; object-store URLs get the fix."""
    if is_remote(data):
        return RemoteDir(data)
    if isinstance(data, str) and data.startswith(OBJECT_STORES):
        example = data.rstrip("/") + "/{name}"
        cmd = f"aws s3 cp {example} -" if data.startswith("s3://") else f"gsutil cat {example}" \
            if data.startswith(("gs://", "gcs://")) else f"YOUR-TOOL-THAT-PRINTS {example}"
        raise DataError(f"{data}: object storage is read through a pipe: command; pass "
                        f"'pipe:{cmd}' (or an https:// URL), or stage the shards with tools/stage.py")
    return Path(data)


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else "no message"


@contextmanager
def open_source(src: str | os.PathLike) -> Iterator[BinaryIO]:
    """One file of a shard location opened for reading: a local path, an http(s) URL, or a pipe
    command (its exit status is checked when the block ends). Failures are DataErrors naming src."""
    if isinstance(src, str) and src.startswith("pipe:"):
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(src[5:], shell=True, stdout=subprocess.PIPE, stderr=err)
            done = False
            try:
                yield proc.stdout
                done = True
            finally:
                if not done:
                    proc.kill()
                proc.stdout.close()
                status = proc.wait()
            if status != 0:
                err.seek(0)
                raise DataError(f"{src}: the command exited with status {status} "
                                f"({_last_line(err.read())}); check the command, the file name and "
                                "your credentials")
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(src, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            hint = ("the URL must be the directory holding manifest.json, as written by tools/shard.py"
                    if e.code == 404 else "check the URL and the server")
            raise DataError(f"{src}: HTTP {e.code} {e.reason}; {hint}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(f"{src}: cannot connect ({reason}); check the URL and that the server "
                            "is up") from None
        with response:
            yield response
    else:
        try:
            f = open(src, "rb")
        except OSError as e:
            raise DataError(f"{src}: {e.strerror or e}; check the shard directory") from None
        with f:
            yield f


def read_bytes(src: str | os.PathLike) -> bytes:
    """The whole content of one (small) file of a shard location."""
    try:
        with open_source(src) as f:
            return f.read()
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"{src}: reading stopped ({e!r}); check the server or the command") from None


def load_manifest(root: RemoteDir) -> dict:
    return shards.parse_manifest(read_bytes(root / MANIFEST), str(root / MANIFEST))


def read_manifest(root: Path | RemoteDir) -> dict:
    """The manifest of a local directory (shards.load_manifest) or of a remote location."""
    return load_manifest(root) if isinstance(root, RemoteDir) else shards.load_manifest(root)


def split_entry(root, split: str, manifest: dict) -> dict:
    if split not in manifest["splits"]:
        raise DataError(f"{root / MANIFEST}: no split {split!r}; choose one of {', '.join(manifest['splits'])}")
    return manifest["splits"][split]


def split_keys(root: RemoteDir, split: str, manifest: dict) -> list[str]:
    """Image file names of a split, in shard order (from its keys file)."""
    text = read_bytes(root / split_entry(root, split, manifest)["keys"]).decode("utf-8")
    return shards.image_names(text, manifest)


def fetch(src: str | os.PathLike, dest: Path, *, size: int | None = None, sha256: str | None = None,
          check=None, bar=None) -> None:
    """Copy one file to ``dest``: under a temporary name, checked (``size`` bytes, ``sha256``, and
    ``check(tmp_path)`` which raises DataError), then renamed. On any failure dest is untouched
    and the temporary file is gone; the DataError names ``src``."""
    digest, n = hashlib.sha256(), 0
    try:
        with atomic_path(dest, sync=False) as tmp:
            with open_source(src) as stream, open(tmp, "wb") as out:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            if size is not None and n != size:
                raise DataError(f"{src}: got {n} bytes, the manifest says {size} (the transfer was cut "
                                "short or the file differs); re-run the same command to resume")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise DataError(f"{src}: sha256 does not match the manifest (corrupt or replaced at the "
                                "source); re-make the shards there, or check the source")
            if check is not None:
                check(tmp)
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"{src}: the transfer stopped after {n} bytes ({e!r}); re-run the same "
                        "command to resume") from None


def _index_check(tar: Path, src: str):
    def check(idx: Path) -> None:
        if idx.read_text() != index_of(tar.read_bytes()):
            raise DataError(f"{src}: this DALI index does not match its tar; re-make the shards at the "
                            "source (tools/shard.py with the same arguments)")
    return check


def _remove_partial(dest: Path, names: set[str]) -> None:
    """Temporary files (fastceleba.files.atomic_path's) left by an interrupted copy."""
    for path in dest.glob(".*.tmp"):
        m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
        if m and m.group(1) in names:
            path.unlink(missing_ok=True)


def stage(src: str | os.PathLike, dest: str | os.PathLike, splits: list[str] | None = None,
          progress: bool = True) -> dict:
    """Copy the manifest, keys, tars and indexes of ``splits`` (default: all) from ``src`` (a URL, a
    pipe or a local shard directory) into the local directory ``dest``, checking every tar's size
    and sha256 against the manifest and every index against its tar. Files already there and
    correct are kept, so re-running after an interruption resumes. The manifest is written last
    and lists the splits staged into ``dest`` so far: the result is an ordinary shard directory.
    Returns the manifest written."""
    from tqdm import tqdm

    loc, dest = location(src), Path(dest)
    if isinstance(loc, Path):
        if not loc.is_dir():
            raise DataError(f"{loc}: no such directory; give a shard directory, an http(s):// URL or "
                            "a pipe: command")
        if dest.exists() and loc.resolve() == dest.resolve():
            raise DataError(f"{dest}: SRC and DEST are the same directory; choose another DEST")
    manifest = shards.parse_manifest(read_bytes(loc / MANIFEST), str(loc / MANIFEST))
    splits = list(manifest["splits"]) if not splits else splits
    for split in splits:
        split_entry(loc, split, manifest)
    staged = []
    if (dest / MANIFEST).is_file():
        try:
            have = json.loads((dest / MANIFEST).read_text())
        except ValueError:
            have = {}
        if have.get("run_id") != manifest.get("run_id"):
            raise DataError(f"{dest}: already holds other shards (another manifest.json); choose an "
                            "empty directory or delete this one")
        staged = list(have.get("splits", {}))
    dest.mkdir(parents=True, exist_ok=True)
    entries = [manifest["splits"][s] for s in splits]
    names = {MANIFEST} | {e["keys"] for e in entries} | {
        s[k] for e in entries for s in e["shards"] for k in ("tar", "index")}
    _remove_partial(dest, names)

    todo = []  # shards whose tar or index is missing or wrong
    for entry in entries:
        for shard in entry["shards"]:
            tar, idx = dest / shard["tar"], dest / shard["index"]
            tar_ok = tar.is_file() and tar.stat().st_size == shard["bytes"] and file_sha256(tar) == shard["sha256"]
            if not (tar_ok and idx.is_file() and idx.read_text() == index_of(tar.read_bytes())):
                todo.append((shard, tar_ok))
    total = sum(shard["bytes"] for shard, tar_ok in todo if not tar_ok)
    with tqdm(total=total, unit="B", unit_scale=True, desc="staging", disable=not progress) as bar:
        for entry in entries:
            keys = dest / entry["keys"]
            fetch(loc / entry["keys"], keys)
            if len(keys.read_text().split()) != entry["num_samples"]:
                keys.unlink()
                raise DataError(f"{loc / entry['keys']}: does not list the {entry['num_samples']} images "
                                "the manifest says; re-make the shards at the source")
        for shard, tar_ok in todo:
            tar = dest / shard["tar"]
            if not tar_ok:
                fetch(loc / shard["tar"], tar, size=shard["bytes"], sha256=shard["sha256"], bar=bar)
            fetch(loc / shard["index"], dest / shard["index"], check=_index_check(tar, loc / shard["index"]))
    keep = set(staged) | set(splits)
    out = dict(manifest, splits={s: e for s, e in manifest["splits"].items() if s in keep})
    atomic_write(dest / MANIFEST, (json.dumps(out, indent=1) + "\n").encode())
    return out
