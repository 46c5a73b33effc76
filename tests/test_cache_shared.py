"""The node-shared cache (cache.py + shm.py) with real processes: decoded once per node, the same
batches as the private cache, one copy in memory, killed jobs' leftovers never read half-written
and cleaned up, and the single-process path unchanged.

Each child is this file run as a script with the environment torchrun/``accelerate launch`` give
a local rank (LOCAL_RANK, LOCAL_WORLD_SIZE); the segments go to a private directory in /dev/shm.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16      # 192 train images -> 12 chunks, so two processes really split the work
BATCH = 50


def child_env(shm_dir: Path, local_rank: int, local_world: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCELEBA_CACHE_SHM", "LOCAL_RANK",
                                                             "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), FASTCELEBA_SHM_DIR=str(shm_dir), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(local_world), RANK=str(local_rank), WORLD_SIZE=str(local_world),
               OMP_NUM_THREADS="1", **extra)
    return env


def spawn(shards, out: Path, shm_dir: Path, rank: int, world: int, mode: str = "run", **extra):
    cmd = [sys.executable, __file__, str(shards), str(out), str(rank), str(world), mode]
    return subprocess.Popen(cmd, env=child_env(shm_dir, rank, world, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=90) -> list[int]:
    codes = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        codes.append(p.returncode)
        if p.returncode not in (0, -9):
            print(out)
    return codes


def run_node(shards, out: Path, shm_dir: Path, world: int = 2) -> list[dict]:
    """``world`` local ranks at once; each child's report."""
    out.mkdir(parents=True, exist_ok=True)
    assert finish([spawn(shards, out, shm_dir, r, world) for r in range(world)]) == [0] * world
    return [json.loads((out / f"report.{r}.json").read_text()) for r in range(world)]


@functools.lru_cache(maxsize=None)
def reference(shards, rank: int, world: int) -> list[dict]:
    """The private (single-process) cache's batches for ``rank``."""
    from fastceleba.loaders import make_loader

    loader = make_loader("cache", shards, "train", BATCH, shuffle=True, seed=0, flip=True, rank=rank,
                         world_size=world, num_workers=1, member="jpg")
    assert loader.shared is None
    loader.set_epoch(1)
    return list(loader)


def assert_same_batches(shards, out: Path, world: int) -> None:
    for r in range(world):
        got = np.load(out / f"batches.{r}.npz")
        ref = reference(shards, r, world)
        assert len(got.files) == 4 * len(ref)
        for j, b in enumerate(ref):
            for name in ("image", "num", "valid", "attr"):
                np.testing.assert_array_equal(got[f"{name}{j}"], b[name].numpy(),
                                              err_msg=f"rank {r} batch {j}")


@pytest.fixture
def shm_dir():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="fastceleba-test-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for k in ("FASTCELEBA_CACHE_SHM", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def region_of(addr: int) -> tuple[str, str]:
    """(file, permissions) of the mapping of this process that holds address ``addr``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return (parts[5] if len(parts) > 5 else ""), parts[1]
    raise AssertionError(f"{addr:#x} is not mapped")


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_two_local_ranks_decode_once_and_share_one_copy(shards, shm_dir, tmp_path):
    reports = run_node(shards, tmp_path / "out", shm_dir)
    chunks = reports[0]["shared"]["chunks"]
    assert chunks == 12
    # every chunk decoded exactly once on the node, by one rank or the other
    assert sum(r["shared"]["filled"] for r in reports) == chunks
    # both mapped the same file (same inode), read-only, and hold its pages together: each
    # process is charged half of them (Pss), so the node holds one copy, not two
    assert reports[0]["shared"]["path"] == reports[1]["shared"]["path"]
    assert reports[0]["inode"] == reports[1]["inode"]
    assert reports[0]["total"] == reports[1]["total"]
    for r in reports:
        assert r["perms"].startswith("r--s")
        assert r["rss_kb"] * 1024 >= 192 * 3 * 64 * 64      # the whole split is mapped and touched
        assert r["pss_kb"] <= 0.6 * r["rss_kb"]             # ... and shared by the two
        assert r["private_kb"] == 0                          # no private copy of any of it
    assert_same_batches(shards, tmp_path / "out", 2)
    assert files(shm_dir) == []                              # removed by its last user


def test_killed_writer_leftover_is_redone_not_read(shards, shm_dir, tmp_path):
    # One rank dies (SIGKILL) right after writing the rows of its third chunk, before marking it
    # done: a half-built segment with 2 chunks done and the third written but not done.
    out = tmp_path / "out"
    out.mkdir()
    dead = spawn(shards, out, shm_dir, 0, 2, FASTCELEBA_SHM_TEST_KILL_AFTER="3")
    assert finish([dead]) == [-9]
    left = files(shm_dir)
    assert any(n.endswith(".part") for n in left) and not any(n.endswith(".data") for n in left)
    # The next job resumes it: only the chunks not marked done are decoded (the third again),
    # and every batch equals the private cache's.
    reports = run_node(shards, out, shm_dir)
    assert sum(r["shared"]["filled"] for r in reports) == 12 - 2
    assert_same_batches(shards, out, 2)
    assert files(shm_dir) == []


def test_killed_users_complete_segment_is_reused_then_removed(shards, shm_dir, tmp_path, monkeypatch):
    from fastceleba.loaders import make_loader, shm

    out = tmp_path / "out"
    out.mkdir()
    assert finish([spawn(shards, out, shm_dir, 0, 1, mode="die", FASTCELEBA_CACHE_SHM="1")]) == [-9]
    data = [n for n in files(shm_dir) if n.endswith(".data")]
    assert len(data) == 1
    assert shm.segments(shm_dir) == [(shm_dir / data[0], False)]   # complete, nobody uses it
    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")
    monkeypatch.setattr("fastceleba.loaders.cache.CHUNK", CHUNK)  # the child's chunking
    loaders = [make_loader("cache", shards, "train", BATCH, shuffle=True, seed=0, flip=True, rank=r,
                           world_size=2, num_workers=1, member="jpg") for r in range(2)]
    assert [ld.shared["filled"] for ld in loaders] == [0, 0]        # reused, nothing decoded
    for r, ld in enumerate(loaders):
        ld.set_epoch(1)
        for a, b in zip(ld, reference(shards, r, 2), strict=True):
            for k in a:
                assert (a[k] == b[k]).all()
        ld.close()
    assert files(shm_dir) == []


def test_unused_segments_are_swept_and_cleaned(shards, shm_dir, capsys, monkeypatch):
    from fastceleba.loaders import make_loader, shm

    def failed_build():  # leaves an unused .part, as a job stopped by an error or a kill does
        def fill(i, arrays):
            arrays["a"][:] = 1
            raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            shm.SharedArrays.open(f"{shm.PREFIX}leftover", shm.Layout({"t": 1}, {"a": ("uint8", (4,))}, 2),
                                  fill, directory=shm_dir)
        left = [(p.name, used) for p, used in shm.segments(shm_dir)]
        assert left[:1] == [(f"{shm.PREFIX}leftover.part", False)]

    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")
    # an unused segment is swept when another one is created ...
    failed_build()
    live = make_loader("cache", shards, "valid", 8, num_workers=1, member="rgb")
    assert live.shared["filled"] == 1
    assert shm.segments(shm_dir) == [(Path(live.shared["path"]), True)]
    # ... and by --clean, which leaves segments in use alone
    failed_build()
    assert len(shm.segments(shm_dir)) == 2
    assert shm.main(["--dir", str(shm_dir), "--clean"]) == 0
    printed = capsys.readouterr().out
    assert "leftover.part" in printed and "unused" in printed and "in use" in printed and "removed" in printed
    assert shm.segments(shm_dir) == [(Path(live.shared["path"]), True)]
    live.close()
    assert files(shm_dir) == []


def test_single_process_path_is_unchanged(shards, shm_dir, monkeypatch):
    from fastceleba.loaders import make_loader

    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(shm_dir))
    private = make_loader("cache", shards, "valid", 10, shuffle=True, flip=True, num_workers=1)
    assert private.shared is None and files(shm_dir) == []
    assert region_of(private.images.data_ptr())[1] != "r--s"        # its own (anonymous) memory
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")                # the same, through a segment
    shared = make_loader("cache", shards, "valid", 10, shuffle=True, flip=True, num_workers=1)
    assert region_of(shared.images.data_ptr()) == (shared.shared["path"], "r--s")  # the segment, read-only
    for a, b in zip(private, shared, strict=True):
        for k in a:
            assert (a[k] == b[k]).all()
    shared.close()
    assert files(shm_dir) == []


def test_forked_children_do_not_keep_the_segment(shards, shm_dir, monkeypatch):
    from fastceleba.loaders import make_loader

    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")
    loader = make_loader("cache", shards, "valid", 10, num_workers=1)
    go_r, go_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked worker of some other loader: alive while the parent closes
        os.write(up_w, b"x")  # running Python: the at-fork hooks have run
        os.read(go_r, 1)
        os._exit(0)
    try:
        os.read(up_r, 1)
        loader.close()
        assert files(shm_dir) == []      # the last user's close removed it, the child alive
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)


def test_no_shared_memory_falls_back_to_a_private_copy(shards, tmp_path, monkeypatch):
    from fastceleba.loaders import make_loader

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(blocker / "shm"))
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")
    with pytest.warns(RuntimeWarning, match="no node-shared memory.*its own memory"):
        loader = make_loader("cache", shards, "valid", 10, num_workers=1)
    assert loader.shared is None and len(list(loader)) == 3


def test_corrupt_jpeg_stays_a_data_error(shards, shm_dir, tmp_path, monkeypatch):
    import warnings

    from fastceleba.errors import DataError
    from fastceleba.loaders import TarMembers, make_loader, open_split, shm

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tm = TarMembers(open_split(copy, "valid"), ["jpg"])
    tar, off = tm.sd.shards[tm.shard[5]][0], int(tm.offset["jpg"][5])
    tm.close()
    with open(tar, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * 16)  # no JPEG SOI marker any more; size unchanged
    monkeypatch.setenv("FASTCELEBA_SHM_DIR", str(shm_dir))
    monkeypatch.setenv("FASTCELEBA_CACHE_SHM", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not taken for a shared-memory problem
        with pytest.raises(DataError, match="valid-00000.tar"):
            make_loader("cache", copy, "valid", 8, member="jpg", num_workers=1)
    assert [used for _, used in shm.segments(shm_dir)] == [False]  # a .part for the sweep


# ---------------------------------------------------------------------------------------------
# The child process


def barrier(out: Path, name: str, rank: int, world: int) -> None:
    (out / f"{name}.{rank}").touch()
    deadline = time.monotonic() + 60
    while sum((out / f"{name}.{r}").exists() for r in range(world)) < world:
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {name}: the other ranks never came")
        time.sleep(0.02)


def mapping_of(path: str) -> dict:
    """The mapping of ``path`` in /proc/self/smaps: inode, permissions and memory accounting."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == path:
            info = {"perms": parts[1], "inode": int(parts[4])}
            for extra in lines[i + 1:]:
                key, _, val = extra.partition(":")
                if " " in key or not val.strip().endswith("kB"):
                    break
                info[key] = int(val.split()[0])
            return {"perms": info["perms"], "inode": info["inode"], "rss_kb": info["Rss"],
                    "pss_kb": info["Pss"], "private_kb": info["Private_Clean"] + info["Private_Dirty"]}
    raise SystemExit(f"{path} is not mapped")


def child(shards: str, out: Path, rank: int, world: int, mode: str) -> None:
    from fastceleba.loaders import cache, make_loader

    cache.CHUNK = CHUNK
    loader = make_loader("cache", shards, "train", BATCH, shuffle=True, seed=0, flip=True, rank=rank,
                         world_size=world, num_workers=1, member="jpg")
    if mode == "die":
        os.kill(os.getpid(), 9)
    loader.set_epoch(1)
    batches = {}
    for j, b in enumerate(loader):
        for name in ("image", "num", "valid", "attr"):
            batches[f"{name}{j}"] = b[name].numpy()
    np.savez(out / f"batches.{rank}.npz", **batches)
    # A rank's batches touch only its half of the split: read all of it, as a rank does over
    # epochs, so that the page accounting below covers the whole segment.
    total = sum(int(t.numpy().sum(dtype=np.int64)) for t in [loader.images, *loader.labels.values()])
    barrier(out, "touched", rank, world)   # every rank has read the whole split
    report = {"shared": loader.shared, "total": total, **mapping_of(loader.shared["path"])}
    barrier(out, "measured", rank, world)  # nobody leaves before all have measured
    (out / f"report.{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    a = sys.argv[1:]
    child(a[0], Path(a[1]), int(a[2]), int(a[3]), a[4])
