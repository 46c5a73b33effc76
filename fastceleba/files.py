"""Atomic writes: every file the toolkit writes appears complete under its name, or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk (unless
    ``sync`` is false: for bulk files that are cheap to remake) and rename it into place. On any
    error the temporary file is removed and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; our outputs are meant to be read
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str, sync: bool = True) -> None:
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")
