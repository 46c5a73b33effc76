#!/usr/bin/env python
"""Time to quality: the seed notebook's own pipeline against fastceleba's fastest, on the same machine.

    python bench/time_to_quality.py                        # AE and VAE, seeds 0-2, synthetic 5,000 faces
    python bench/time_to_quality.py --models vae --seeds 0 --data shards/

For each model and seed:

1. seed pipeline: fastceleba/train.py --loader pil --workers 0 --recipe notebook, eager fp32, --epochs 5:
   the notebook's PIL folder DataLoader (JPEG decode, resize, centre crop in the training process) and its
   schedule. Its test PSNR after those epochs is the target.
2. fastceleba: --loader FAST (default cache) --recipe default, eager, trained for a budget of 1, 2, ...
   epochs (each budget its own run, as a user would train, the recipe's schedules fitted to it) until a
   run's test PSNR reaches the target. Eager, not --compile: on a CPU compiling costs more than it gains
   in a run this short (its import and compilation ~2.5 s with a warm Inductor cache, 12 s cold, against
   ~0.4 s saved per epoch; docs/benchmarks.md); --compile measures it anyway.

Reported per run: process wall time (start-up, data, compilation, training, test evaluation) and the
training loop's own seconds (metrics.jsonl); the speed-up is the seed pipeline's time over fastceleba's
first run to reach the target, per seed and as the median over seeds. Both sides evaluate valid only
after their last epoch, write no pictures and skip the sample-quality pass (--sample-features none: the
race is to a PSNR, and looking for Inception weights costs seconds where they cannot be downloaded).
Runs go into OUT/<model>-seed<S>/{seed,fast-<eager|compile>-<fp32|bf16>-e<E>}; a finished run is not trained again
(one finished with other flags or an older recipe stops the benchmark: delete OUT to measure afresh).
Writes OUT/time_to_quality.{json,md} (with --fast-precision bf16: time_to_quality_bf16.*) with the
machine beside the figures.
Exit status: 0 done (also when fastceleba never reached the target: that is a result, shown as such);
2 bad input or a run that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastceleba.errors import DataError  # noqa: E402
from fastceleba.files import atomic_write, write_json  # noqa: E402
from fastceleba.loaders import KINDS  # noqa: E402
from fastceleba.shards import load_manifest  # noqa: E402
# sibling bench scripts: running one puts bench/ first on sys.path
from loader import machine  # noqa: E402
from quality import finished_seconds, synthetic_shards, timed_train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="shard directory whose manifest names the JPEG folder (pil reads it); default: "
                        "bench/quality.py's synthetic set")
    p.add_argument("--synthetic", type=int, default=5000, help="images of the synthetic set (default %(default)s)")
    p.add_argument("--cache-dir", default="data/quality", help="where the synthetic set is kept (default %(default)s)")
    p.add_argument("--out", default="runs/time_to_quality", help="benchmark directory (default %(default)s)")
    p.add_argument("--models", default="ae,vae", help="comma-separated: ae, vae (default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--seed-epochs", type=int, default=5,
                   help="epochs of the seed pipeline, whose test PSNR is the target (default %(default)s, the "
                        "notebook's)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="largest epoch budget fastceleba tries (default: --seed-epochs)")
    p.add_argument("--fast-loader", choices=KINDS, default="cache",
                   help="fastceleba's loader (default %(default)s, the fastest on a CPU; dali on a GPU)")
    p.add_argument("--compile", action="store_true",
                   help="fastceleba side through torch.compile (default eager: on a CPU it does not pay back in "
                        "a run of a few epochs; on a GPU try both)")
    p.add_argument("--fast-precision", choices=("no", "bf16"), default="no",
                   help="fastceleba side's mixed precision (Accelerate's ACCELERATE_MIXED_PRECISION): 'no' is fp32 "
                        "like the seed pipeline, 'bf16' autocast (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step, both sides (default %(default)s)")
    args = p.parse_args(argv)
    try:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    if not args.models or any(m not in ("ae", "vae") for m in args.models) or not args.seeds:
        p.error("--models takes ae and/or vae, --seeds at least one integer")
    args.max_epochs = args.max_epochs or args.seed_epochs
    if min(args.seed_epochs, args.max_epochs, args.batch_size) < 1:
        p.error("--seed-epochs, --max-epochs and --batch-size must be >= 1")
    return args


def train(run: Path, data: Path, model: str, seed: int, epochs: int, batch: int, flags: list[str],
          precision: str = "no") -> dict:
    """One fastceleba/train.py process (or its finished result): test PSNR, wall and loop seconds."""
    train_args = ["--model", model, "--seed", str(seed), "--data", str(data), "--epochs", str(epochs), "--batch-size",
                  str(batch), "--eval-every", "0", "--no-pictures", "--sample-features", "none", *flags]
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": precision}
    seconds = finished_seconds(run, train_args, env)
    if seconds is None:
        code, seconds = timed_train(run, train_args, "time-to-quality", env=env)
        if code != 0:
            raise DataError(f"{run}: train.py exited with status {code} (its message is above); delete {run} "
                            "and re-run")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    loop = sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if line.strip())
    return {"run": str(run), "epochs": epochs, "psnr": summary["test"]["psnr"], "wall_s": seconds, "loop_s": loop}


def race(args: argparse.Namespace, data: Path, model: str, seed: int) -> dict:
    base = Path(args.out) / f"{model}-seed{seed}"
    seed_run = train(base / "seed", data, model, seed, args.seed_epochs, args.batch_size,
                     ["--loader", "pil", "--workers", "0", "--recipe", "notebook"])
    target = seed_run["psnr"]
    fast_flags = ["--loader", args.fast_loader, "--recipe", "default", *(["--compile"] if args.compile else [])]
    tries = []
    for epochs in range(1, args.max_epochs + 1):
        # one directory per setting, so a finished run is only reused for the very same flags
        name = (f"fast-{'compile' if args.compile else 'eager'}-"
                f"{'fp32' if args.fast_precision == 'no' else args.fast_precision}-e{epochs}")
        tries.append(train(base / name, data, model, seed, epochs, args.batch_size, fast_flags,
                           args.fast_precision))
        if tries[-1]["psnr"] >= target:
            break
    reached = tries[-1] if tries[-1]["psnr"] >= target else None
    row = {"model": model, "seed": seed, "target_psnr": target, "seed_run": seed_run, "fast_tries": tries,
           "fast_run": reached}
    if reached:
        row["speedup_wall"] = seed_run["wall_s"] / reached["wall_s"]
        row["speedup_loop"] = seed_run["loop_s"] / reached["loop_s"]
    return row


def markdown(rows: list[dict], info: dict) -> str:
    m = info["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}",
             f"seed pipeline: pil, 0 workers, eager fp32, recipe notebook, {info['seed_epochs']} epochs; "
             f"fastceleba: {info['fast']}", "",
             "| model | seed | target test PSNR | seed pipeline wall s (loop s) | fastceleba epochs | its test PSNR "
             "| its wall s (loop s) | speed-up wall | speed-up loop |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, f = r["seed_run"], r["fast_run"]
        fast = (f"{f['epochs']} | {f['psnr']:.2f} | {f['wall_s']:.0f} ({f['loop_s']:.0f}) | "
                f"**{r['speedup_wall']:.1f}×** | {r['speedup_loop']:.1f}×") if f else \
            f"not reached in {len(r['fast_tries'])} | {r['fast_tries'][-1]['psnr']:.2f} | – | – | –"
        lines.append(f"| {r['model']} | {r['seed']} | {r['target_psnr']:.2f} | {s['wall_s']:.0f} ({s['loop_s']:.0f}) "
                     f"| {fast} |")
    for model, med in info["median_speedup_wall"].items():
        lines.append(f"\n{model}: median speed-up {med:.1f}× wall, "
                     f"{info['median_speedup_loop'][model]:.1f}× training loop")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = Path(args.data) if args.data else synthetic_shards(Path(args.cache_dir), args.synthetic)
        load_manifest(data)
        rows = [race(args, data, m, s) for m in args.models for s in args.seeds]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"machine": machine(), "data": str(data), "seed_epochs": args.seed_epochs,
            "fast": f"{args.fast_loader}, {'torch.compile' if args.compile else 'eager'}, "
                    f"{'fp32' if args.fast_precision == 'no' else args.fast_precision + ' autocast'}, recipe default",
            "median_speedup_wall": {}, "median_speedup_loop": {}}
    for model in args.models:
        won = [r for r in rows if r["model"] == model and r["fast_run"]]
        if won:
            info["median_speedup_wall"][model] = statistics.median(r["speedup_wall"] for r in won)
            info["median_speedup_loop"][model] = statistics.median(r["speedup_loop"] for r in won)
    out = Path(args.out)
    stem = "time_to_quality" if args.fast_precision == "no" else f"time_to_quality_{args.fast_precision}"
    write_json(out / f"{stem}.json", {**info, "runs": rows})
    text = markdown(rows, info)
    atomic_write(out / f"{stem}.md", text)
    print(text + f"[time-to-quality] wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
