"""Host memory of the cache loader on one node: N local ranks, private caches vs the node-shared one.

    python bench/cache_memory.py --data SHARDS [--ranks 2] [--split train] [--member rgb]

Runs ``--ranks`` processes with LOCAL_RANK / LOCAL_WORLD_SIZE set (as torchrun and ``accelerate
launch`` do) twice: sharing off (FASTCELEBA_CACHE_SHM=0) and on. Each process makes the cache
loader, reads the whole cache once (as a rank does over a few epochs) and reports, from
/proc/self/smaps_rollup its anonymous and shared-memory Pss (its fair share of those pages: a
page mapped by n processes counts 1/n in each; libraries, which are file pages, are left out)
before make_loader and after, and how many chunks it decoded. The sum of the increases is what
the cache costs the node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rollup() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, val = line.partition(":")
        if val.strip().endswith("kB"):
            out[key] = int(val.split()[0]) * 1024
    return out


def region(addr: int, nbytes: int) -> dict:
    """Rss and Pss of the mappings that hold [addr, addr + nbytes): the cache's own pages, private
    or shared (numpy's hugepage advice splits a large array into several mappings)."""
    out = {"files": set(), "Rss": 0, "Pss": 0}
    take = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            take = lo < addr + nbytes and addr < hi
            if take:
                out["files"].add(head[5] if len(head) > 5 else "[anon]")
        elif take and head[0] in ("Rss:", "Pss:"):
            out[head[0][:-1]] += int(head[1]) * 1024
    out["files"] = sorted(out["files"])
    return out


def barrier(d: Path, name: str, rank: int, world: int) -> None:
    (d / f"{name}.{rank}").touch()
    while sum((d / f"{name}.{r}").exists() for r in range(world)) < world:
        time.sleep(0.02)


def child(args) -> None:
    import numpy as np

    from fastceleba.loaders import make_loader

    rank, world, d = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]), Path(args.child)
    before = rollup()
    loader = make_loader("cache", args.data, args.split, 128, shuffle=True, rank=rank, world_size=world,
                         num_workers=1, member=args.member)
    sum(int(t.numpy().sum(dtype=np.int64)) for t in [loader.images, *loader.labels.values()])
    barrier(d, "read", rank, world)
    after, mine = rollup(), region(loader.images.data_ptr(), loader.images.nbytes)
    barrier(d, "measured", rank, world)
    (d / f"{rank}.json").write_text(json.dumps({
        "rss_before": before["Rss"], "rss_after": after["Rss"],
        "pss_before": before["Pss_Anon"] + before["Pss_Shmem"], "pss_after": after["Pss_Anon"] + after["Pss_Shmem"],
        "cache_bytes": loader.images.nbytes,
        "region_rss": mine["Rss"], "region_pss": mine["Pss"], "region": mine["files"], "shared": loader.shared}))


def run(args, shared: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for r in range(args.ranks):
            env = dict(os.environ, PYTHONPATH=str(ROOT), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(args.ranks),
                       FASTCELEBA_CACHE_SHM="1" if shared else "0", OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", d, "--data", str(args.data),
                                           "--split", args.split, "--member", args.member], env=env))
        if any(p.wait() for p in procs):
            raise SystemExit("a rank failed")
        return [json.loads((Path(d) / f"{r}.json").read_text()) for r in range(args.ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="shard directory")
    p.add_argument("--ranks", type=int, default=2, help="local processes")
    p.add_argument("--split", default="train")
    p.add_argument("--member", default="rgb", help="jpg or rgb (memory is the same; rgb builds faster)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    mib = 2 ** 20
    print(f"{args.ranks} local ranks, split {args.split!r}")
    print("| cache | split (uint8) | its pages charged to each rank (Pss) | node total | "
          "other memory growth per rank | chunks decoded per rank |")
    print("|---|---:|---:|---:|---:|---|")
    for shared in (False, True):
        reps = run(args, shared)
        pss = [r["region_pss"] for r in reps]
        other = [r["pss_after"] - r["pss_before"] - r["region_pss"] for r in reps]
        filled = [r["shared"]["filled"] for r in reps] if shared else ["all"] * len(reps)
        print(f"| {'node-shared' if shared else 'private'} | {reps[0]['cache_bytes'] / mib:.1f} MiB | "
              f"{', '.join(f'{x / mib:.1f}' for x in pss)} MiB | {sum(pss) / mib:.1f} MiB | "
              f"{', '.join(f'{x / mib:.1f}' for x in other)} MiB | {', '.join(map(str, filled))} |")


if __name__ == "__main__":
    main()
