"""Run under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`.

Each rank reads its share of the train split with the dali, wds and cache loaders (rank and world
size from the Accelerator; the loaders are NOT passed through accelerator.prepare) and gathers the
valid sample numbers across ranks every batch; rank 0 writes what every rank saw to --out (JSON)
for tests/test_loaders.py."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from fastceleba.loaders import make_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="shard directory")
    p.add_argument("--out", required=True, help="JSON file rank 0 writes")
    p.add_argument("--batch-size", type=int, default=50, help="batch size per rank")
    args = p.parse_args()

    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    report = {"world_size": world, "kinds": {}}
    for kind in ("dali", "wds", "cache"):
        loader = make_loader(kind, args.data, "train", args.batch_size, shuffle=True, seed=0,
                             rank=rank, world_size=world, num_workers=1)
        loader.set_epoch(1)
        mine, gathered, batches = [], [], 0
        for batch in loader:
            batches += 1
            mine += batch["num"][batch["valid"]].tolist()
            # every rank must reach this collective the same number of times with the same shape
            nums = acc.gather(batch["num"].to(torch.int64))
            valid = acc.gather(batch["valid"])
            gathered += nums[valid].tolist()
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, {"batches": batches, "nums": mine})
        report["kinds"][kind] = {"ranks": ranks, "gathered": gathered}
    if acc.is_main_process:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, args.out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
