"""Arrays built once per node in shared memory by every process that needs them, then mapped read-only.

The cache loader (cache.py) uses it so the local ranks of a node decode a split once, together,
and hold one copy of it in host memory instead of one per rank.

Files, all in ``directory`` (``$FASTCELEBA_SHM_DIR``, default ``/dev/shm``; it must be a local
filesystem, tmpfs for memory speed; never NFS, whose locks differ), named from a digest of what
was asked (the split's manifest entry with every shard's sha256, split, size, crop, member, chunk
size), so two jobs over the same data share and two over different data never collide:

    fastceleba-cache-u{uid}-{split}-{digest}.lock   flock for the short critical sections; byte i
                                                    is locked (fcntl) by whoever fills chunk i
    ...part                                         being built: header, one "done" byte a chunk,
                                                    then the arrays
    ...data                                         the same file renamed once every chunk is done

How a process gets the arrays (``SharedArrays.open``):

1. Under the flock: a valid ``.data`` (header equal to what was asked, every chunk done) is
   attached (step 4). Otherwise an existing ``.part`` of the same digest is joined, or a new one
   is created complete with its header under a temporary name and renamed (with the whole size
   reserved by posix_fallocate, so a full tmpfs fails here with ENOSPC rather than SIGBUS later).
2. Without the flock, every process fills chunks: it takes chunk i by a non-blocking fcntl lock
   on byte i of the lock file, skips it if another process holds it or its done byte is set,
   writes its rows through a shared mapping, then sets its done byte (os.pwrite, after the rows).
   Its ``workers`` threads share the work (fcntl locks belong to a process, so the threads also
   agree among themselves with a threading lock).
3. With nothing left to take, it waits on each chunk still not done with a blocking lock on its
   byte; the lock comes back when the filler finishes, or when it dies (the kernel drops a dead
   process's locks), and then the chunk, still not done, is filled by the waiter. The rows of a
   chunk whose done byte is not set are never trusted: a killed filler's half-written rows are
   written again. A ``.part`` left by a killed job is resumed the same way by the next one.
4. Under the flock, whoever is first renames ``.part`` to ``.data``; every process maps
   ``.data`` read-only and holds a shared flock on it for as long as it uses it.

Coordination is by file locks, not ``torch.distributed``: the cache is built inside make_loader,
before (or without) any process group; locks are released by the kernel when a process dies, so a
killed job can never leave a state that blocks or misleads the next one; and they also let
independent jobs on a node (a sweep, train and evaluation) share one copy. No process needs to
know how many others there are: 1 process fills every chunk, 8 share them.

Lifecycle: when a user closes (``close()``, garbage collection or interpreter exit), it drops its
shared flock and, if no other process holds one (a non-blocking exclusive flock succeeds), removes
``.data`` and ``.lock``: the segment disappears with its last user. A process killed by SIGKILL
or the OOM killer runs no exit code: its ``.data`` stays until the next job with the same digest
reuses and then removes it, or any new build sweeps it (unused segments of other digests are
removed before a new one is created), or ``python -m fastceleba.loaders.shm --clean`` (removes
every unused segment; without ``--clean`` it only lists them). A forked child (another loader's
DataLoader worker) closes its copies of the lock fds at once, so it never keeps a segment alive.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import mmap
import os
import signal
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

MAGIC = b"FCSHM001"
PAGE = 4096
PREFIX = "fastceleba-cache-"
# Tests only: SIGKILL this process after it has written (but not marked done) its k-th chunk.
KILL_ENV = "FASTCELEBA_SHM_TEST_KILL_AFTER"


def shm_dir() -> Path:
    return Path(os.environ.get("FASTCELEBA_SHM_DIR", "/dev/shm"))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def _round(n: int) -> int:
    return -(-n // PAGE) * PAGE


class SegmentError(OSError):
    """The shared segment cannot be had (no room in its directory, no such directory, no
    permission, another process's file in the way): the caller may fall back to private memory.
    Errors of the ``fill`` function are never turned into this."""


class Layout:
    """Where the header, the done bytes and each array lie in the file."""

    def __init__(self, key: dict, arrays: dict[str, tuple[str, tuple[int, ...]]], chunks: int):
        self.key, self.chunks = key, chunks
        self.arrays = {k: (np.dtype(d).str, tuple(int(x) for x in s)) for k, (d, s) in arrays.items()}
        self.header = json.dumps({"key": key, "arrays": self.arrays, "chunks": chunks},
                                 sort_keys=True).encode()
        self.flags = _round(16 + len(self.header))
        pos = _round(self.flags + chunks)
        self.offsets = {}
        for name, (dtype, shape) in self.arrays.items():
            self.offsets[name] = pos
            pos = _round(pos + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.size = pos

    def head_bytes(self) -> bytes:
        return MAGIC + len(self.header).to_bytes(8, "little") + self.header

    def matches(self, fd: int) -> bool:
        """The file behind ``fd`` has this layout (same header and size)."""
        head = self.head_bytes()
        return os.fstat(fd).st_size == self.size and os.pread(fd, len(head), 0) == head

    def done(self, fd: int) -> np.ndarray:
        return np.frombuffer(os.pread(fd, self.chunks, self.flags), np.uint8) == 1

    def views(self, buf) -> dict[str, np.ndarray]:
        return {name: np.frombuffer(buf, np.dtype(dtype), int(np.prod(shape)), self.offsets[name])
                .reshape(shape) for name, (dtype, shape) in self.arrays.items()}


def _open_lock(path: Path) -> int:
    """An fd of the lock file holding its exclusive flock (the file still linked under ``path``)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by its last user while we waited: take the new one


def _unused(path: Path) -> bool:
    """Nobody holds a flock on ``path`` (True also when it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# The fds through which this process holds a shared flock on a ``.data``, and their finalizers.
_held: dict[int, weakref.finalize] = {}


def _forget_in_child() -> None:
    """After fork: the child (a DataLoader worker of another loader, say) must neither keep the
    parent's segments "in use" after the parent is gone nor release them itself."""
    for fd, fin in list(_held.items()):
        fin.detach()
        os.close(fd)  # the parent's fd still holds the flock: closing a copy does not drop it
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _release(data_fd: int, lock_path: Path, data_path: Path) -> None:
    """Drop our use of ``.data``; remove it (and the lock) if we were its last user."""
    _held.pop(data_fd, None)
    try:
        lock = _open_lock(lock_path)
    except OSError:
        os.close(data_fd)
        return
    try:
        os.close(data_fd)
        if _unused(data_path):
            data_path.unlink(missing_ok=True)
            if not lock_path.with_suffix(".part").exists():  # a builder's chunk locks live on it
                lock_path.unlink(missing_ok=True)
    finally:
        os.close(lock)


class SharedArrays:
    """Named arrays of one file in shared memory: ``arrays`` are read-only numpy views.

    ``filled``: how many chunks this process wrote (the others came from other processes or
    from a ``.data`` already there). ``path``: the ``.data`` file."""

    def __init__(self, path: Path, buf: mmap.mmap, arrays: dict[str, np.ndarray], filled: int,
                 chunks: int, finalizer: weakref.finalize):
        self.path, self._buf, self.arrays = path, buf, arrays
        self.filled, self.chunks, self._finalizer = filled, chunks, finalizer

    def close(self) -> None:
        """Stop using the segment (removing it if this was its last user). The arrays stay
        readable in this process (the mapping lives as long as they do)."""
        self._finalizer()

    @classmethod
    def open(cls, name: str, layout: Layout, fill: Callable[[int, dict[str, np.ndarray]], None],
             workers: int = 1, directory: Path | None = None,
             on_chunk: Callable[[int], None] | None = None,
             initializer: Callable[[], None] | None = None) -> "SharedArrays":
        """Attach to, join or start the build of segment ``name``; see the module docstring.

        fill(i, arrays) writes chunk i's rows into the writable ``arrays``; on_chunk(i) is called
        after each chunk this process filled (for progress bars); initializer runs in each of
        the ``workers`` threads. An error of fill() propagates (the chunk stays not done)."""
        d = directory or shm_dir()
        lock_path, part_path, data_path = (d / f"{name}{ext}" for ext in (".lock", ".part", ".data"))
        lock = part_fd = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            lock = _open_lock(lock_path)
            found = _attach(data_path, layout)
            if found is not None:
                return cls._made(data_path, lock_path, *found, filled=0, chunks=layout.chunks)
            part_fd = _join_or_create(part_path, layout, d)
            fcntl.flock(part_fd, fcntl.LOCK_SH)  # "in use" for sweeps while we build
        except SegmentError:
            raise
        except OSError as e:
            raise SegmentError(e.errno, f"{d}: {e.strerror or e}") from e
        finally:
            if part_fd is None:
                if lock is not None:
                    os.close(lock)
            else:
                fcntl.flock(lock, fcntl.LOCK_UN)  # keep the fd: its byte locks claim chunks
        try:
            filled = _build(lock, part_fd, layout, fill, workers, on_chunk, initializer)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not data_path.exists():
                os.rename(part_path, data_path)
            found = _attach(data_path, layout)
            if found is None:
                raise SegmentError(f"{data_path}: the shared cache vanished or is damaged as it was built")
            return cls._made(data_path, lock_path, *found, filled=filled, chunks=layout.chunks)
        finally:
            os.close(part_fd)
            os.close(lock)

    @classmethod
    def _made(cls, data_path, lock_path, fd, buf, arrays, *, filled, chunks) -> "SharedArrays":
        fin = weakref.finalize(buf, _release, fd, lock_path, data_path)  # also runs at exit
        _held[fd] = fin
        return cls(data_path, buf, arrays, filled, chunks, fin)


def _attach(data_path: Path, layout: Layout):
    """(fd holding a shared flock, read-only mapping, views) of a valid ``.data``; None if there is
    none. An invalid one (another layout, a chunk not done) is removed. Call under the flock."""
    try:
        fd = os.open(data_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if not (layout.matches(fd) and layout.done(fd).all()):
        os.close(fd)
        if _unused(data_path):
            data_path.unlink(missing_ok=True)
            return None
        raise SegmentError(f"{data_path}: in use but not the cache asked for; remove it and retry")
    fcntl.flock(fd, fcntl.LOCK_SH)
    # Map through another open file: mmap keeps a dup of the fd it is given, which would hold our
    # flock for as long as the mapping lives; ``fd`` alone holds it, until _release closes it.
    map_fd = os.open(data_path, os.O_RDONLY)
    try:
        buf = mmap.mmap(map_fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(map_fd)
    return fd, buf, layout.views(buf)


def _join_or_create(part_path: Path, layout: Layout, d: Path) -> int:
    """fd of ``.part`` with this layout: the existing one (a build in progress, or left by a killed
    job: resumed) or a new one. Call under the flock."""
    try:
        fd = os.open(part_path, os.O_RDWR)
        if layout.matches(fd):
            return fd
        os.close(fd)
        part_path.unlink()  # another layout under our digest: an older version of this module
    except FileNotFoundError:
        pass
    sweep(d)
    tmp = part_path.with_name(f"{part_path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, layout.size)  # reserve it all now: ENOSPC here, never SIGBUS
        os.pwrite(fd, layout.head_bytes(), 0)
        os.rename(tmp, part_path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def _build(lock: int, part_fd: int, layout: Layout, fill, workers: int, on_chunk, initializer) -> int:
    """Fill every chunk not done yet, sharing them with whoever else builds; returns how many this
    process filled. Returns when every chunk is done (by anyone)."""
    # mmap keeps a dup of its fd: map through a new open file of the same inode, so that the mapping
    # (which an exception's traceback may keep alive) never holds part_fd's "in use" flock.
    map_fd = os.open(f"/proc/self/fd/{part_fd}", os.O_RDWR)
    try:
        buf = mmap.mmap(map_fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(map_fd)
    arrays = layout.views(buf)
    kill_after = int(os.environ.get(KILL_ENV, "0")) or None
    taken: set[int] = set()
    guard = threading.Lock()
    count = [0]
    failed = threading.Event()  # one thread's error stops the others taking more chunks

    def finish(i: int) -> None:
        fill(i, arrays)
        with guard:
            count[0] += 1
            if kill_after is not None and count[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # rows written, done byte not: half-written
        os.pwrite(part_fd, b"\x01", layout.flags + i)
        if on_chunk:
            on_chunk(i)

    def claim() -> int | None:
        with guard:
            if failed.is_set():
                return None
            done = layout.done(part_fd)
            for i in np.flatnonzero(~done):
                i = int(i)
                if i in taken:
                    continue
                try:
                    fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, i)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        continue
                    raise
                if layout.done(part_fd)[i]:  # finished between our two reads
                    fcntl.lockf(lock, fcntl.LOCK_UN, 1, i)
                    continue
                taken.add(i)
                return i
        return None

    def work() -> None:
        while (i := claim()) is not None:
            try:
                finish(i)
            except BaseException:
                failed.set()
                raise
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN, 1, i)

    try:
        with ThreadPoolExecutor(max(1, workers), initializer=initializer) as pool:
            for f in [pool.submit(work) for _ in range(max(1, workers))]:
                f.result()
        # Chunks other processes hold: wait for each; if its filler died, fill it ourselves.
        for i in np.flatnonzero(~layout.done(part_fd)):
            i = int(i)
            fcntl.lockf(lock, fcntl.LOCK_EX, 1, i)
            try:
                if not layout.done(part_fd)[i]:
                    finish(i)
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN, 1, i)
    finally:
        arrays.clear()  # drop the views first: an mmap cannot close while they exist
        try:
            buf.close()
        except BufferError:  # a view still referenced somewhere: unmapped when it is collected
            pass
    return count[0]


def segments(directory: Path | None = None) -> list[tuple[Path, bool]]:
    """Every segment file (``.part``/``.data``) in ``directory`` and whether a process uses it."""
    d = directory or shm_dir()
    return [(p, not _unused(p)) for p in sorted(d.glob(f"{PREFIX}*")) if p.suffix in (".part", ".data")]


def sweep(directory: Path | None = None) -> list[Path]:
    """Remove the segments no process uses (left by killed jobs) and their locks; returns them.
    Segments whose lock is held right now are skipped."""
    d = directory or shm_dir()
    removed = []
    for lock_path in sorted(d.glob(f"{PREFIX}*.lock")):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if os.stat(lock_path).st_ino != os.fstat(fd).st_ino:
                continue
            files = [lock_path.with_suffix(e) for e in (".part", ".data")]
            if all(_unused(p) for p in files):
                for p in files:
                    if p.exists():
                        p.unlink()
                        removed.append(p)
                lock_path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    for tmp in d.glob(f"{PREFIX}*.part.*.tmp"):  # creation interrupted between open and rename
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="List or remove the node-shared cache segments "
                                "(segments no running process uses are left only by killed jobs).")
    p.add_argument("--dir", type=Path, default=None, help="segment directory (default $FASTCELEBA_SHM_DIR "
                   "or /dev/shm)")
    p.add_argument("--clean", action="store_true", help="remove every segment no process uses")
    args = p.parse_args(argv)
    for path, used in segments(args.dir):
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB  {'in use' if used else 'unused'}")
    if args.clean:
        for path in sweep(args.dir):
            print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
