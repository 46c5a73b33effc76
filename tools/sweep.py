#!/usr/bin/env python
"""Grid search over the VAE's latent size, done properly: choose on valid, report the choice on test.

    python tools/sweep.py --data shards --out runs/sweep                       # latent 16,32,64,80,128
    python tools/sweep.py --data shards --out runs/sweep --latent-dims 32,80 -- --epochs 10 --flip
    python tools/sweep.py --data shards --out runs/sweep --launcher "accelerate launch --multi_gpu"

Each latent size is trained by fastceleba/train.py in its own process (OUT/latent_D, with --resume, so
an interrupted sweep continues where it stopped) and scored on the valid split only. The best one by
--metric is then evaluated once on the test split. The notebook split its images into train and test
only, so its grid search could only choose on the test images it then reported; here the test split
takes no part in the choice.

Writes OUT/sweep.csv, OUT/sweep.json (every run's valid metrics, the best run's test metrics) and
OUT/sweep.png (valid -ELBO, KLD and MSE against the latent size). Arguments after `--` go to train.py.
Exit status: 0 done; 2 bad input or a training run that failed; runs that diverge (train.py exit 3)
are listed as diverged and skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

try:
    import fastceleba  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastceleba.errors import DataError
from fastceleba.files import atomic_path, atomic_write, write_json
from fastceleba.shards import load_manifest
from fastceleba.train import EXIT_DIVERGED

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "fastceleba" / "train.py"
COLUMNS = ("latent_dim", "status", "neg_elbo", "kld", "mse", "psnr", "r2", "baseline_mse")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard directory (tools/shard.py output)")
    p.add_argument("--out", default="runs/sweep", help="sweep directory; each run goes to OUT/latent_D")
    p.add_argument("--latent-dims", default="16,32,64,80,128", help="comma-separated latent sizes to train (default %(default)s)")
    p.add_argument("--metric", choices=("neg_elbo", "mse"), default="neg_elbo",
                   help="valid metric to minimize (default: neg_elbo, the VAE's own objective; mse ignores "
                        "how well the latent space matches the prior)")
    p.add_argument("--launcher", default=None,
                   help='command that runs train.py, e.g. "accelerate launch --multi_gpu" (default: this python)')
    args = p.parse_args(argv)
    try:
        args.dims = sorted({int(d) for d in args.latent_dims.split(",") if d.strip()})
    except ValueError:
        p.error(f"--latent-dims: not a list of integers: {args.latent_dims!r}")
    if not args.dims or min(args.dims) < 1:
        p.error("--latent-dims needs at least one positive integer")
    for flag in ("--model", "--latent-dim", "--out", "--data", "--no-test"):
        if flag in extra:
            p.error(f"{flag} is set by the sweep; leave it out of the arguments after --")
    return args, extra


def train_one(args: argparse.Namespace, dim: int, extra: list[str]) -> dict:
    """Train (or resume) one latent size in a subprocess; returns its row for the table."""
    run = Path(args.out) / f"latent_{dim}"
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = [*launcher, str(TRAIN_SCRIPT), "--model", "vae", "--latent-dim", str(dim), "--data", str(args.data),
           "--out", str(run), "--resume", "--no-test", *extra]
    print(f"[sweep] latent {dim}: {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd).returncode
    if code == EXIT_DIVERGED:
        return {"latent_dim": dim, "status": "diverged", "run": str(run)}
    if code != 0:
        raise DataError(f"{run}: train.py exited with status {code} (its message is above); fix it and re-run "
                        "the sweep, finished runs are kept")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    valid = summary.get("valid") or {}
    if not valid.get("num_samples"):
        raise DataError(f"{run / 'summary.json'}: no valid metrics (an empty valid split, or --eval-every 0), "
                        "so the sweep cannot choose; re-shard with a valid split (tools/shard.py --split)")
    return {"latent_dim": dim, "status": "ok", "run": str(run), **{k: valid.get(k) for k in COLUMNS[2:]},
            "valid": valid, "train_args": summary["args"]}


def evaluate_on_test(best: dict) -> dict:
    """The chosen model's test metrics, with the loader settings it was trained with."""
    import torch
    from accelerate import Accelerator

    from fastceleba.loaders import make_loader
    from fastceleba.metrics import evaluate, mean_image
    from fastceleba.models import load_pretrained

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    targs = best["train_args"]
    model, _ = load_pretrained(best["run"], map_location=accelerator.device)

    def loader(split: str):
        return make_loader(targs["loader"], targs["data"], split, targs["batch_size"], device=accelerator.device,
                           seed=targs["seed"], num_workers=targs["workers"], crop=targs["crop"])

    baseline = mean_image(loader("train"), accelerator)
    return evaluate(model, loader("test"), accelerator, baseline, seed=targs["seed"])


def table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.5g}" if isinstance(v, float) else str(v if v is not None else "-")
    lines = [COLUMNS] + [tuple(cell(r.get(c)) for c in COLUMNS) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict], metric: str, best: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    dims = [r["latent_dim"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(dims, [r["neg_elbo"] for r in ok], "o-", label="-ELBO")
    left.set_ylabel("valid -ELBO per image")
    kld = left.twinx()  # KLD is a small part of -ELBO: its own scale
    kld.plot(dims, [r["kld"] for r in ok], "s--", color="tab:orange")
    kld.set_ylabel("valid KLD per image (dashed)", color="tab:orange")
    right.plot(dims, [r["mse"] for r in ok], "o-", label="VAE")
    right.axhline(ok[0]["baseline_mse"], color="gray", ls=":", label="mean training image")
    right.set_ylabel("valid MSE per pixel")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("latent size")
        ax.axvline(best["latent_dim"], color="tab:red", alpha=0.3, lw=6, label=f"best by {metric}")
        ax.legend(fontsize=8)
    fig.suptitle("VAE latent-size sweep (valid split)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def sweep(args: argparse.Namespace, extra: list[str]) -> dict:
    load_manifest(Path(args.data))  # a clear error before any training starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [train_one(args, dim, extra) for dim in args.dims]
    ok = [r for r in rows if r["status"] == "ok" and r[args.metric] is not None and math.isfinite(r[args.metric])]
    if not ok:
        raise DataError(f"{out}: every run diverged; lower --lr (after --)")
    best = min(ok, key=lambda r: r[args.metric])
    print(table(rows))
    print(f"[sweep] best by valid {args.metric}: latent {best['latent_dim']}; evaluating it on test", flush=True)
    best_test = evaluate_on_test(best)
    result = {"metric": args.metric, "train_args": extra,
              "runs": [{k: v for k, v in r.items() if k != "train_args"} for r in rows],
              "best": {"latent_dim": best["latent_dim"], "run": best["run"], "valid": best["valid"],
                       "test": best_test}}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "sweep.csv", buf.getvalue())
    write_json(out / "sweep.json", result)
    plot(rows, args.metric, best, out / "sweep.png")
    print(f"[sweep] test of latent {best['latent_dim']}: -elbo {best_test['neg_elbo']:.2f} mse {best_test['mse']:.5f} "
          f"psnr {best_test['psnr']:.2f} dB (mean-image baseline mse {best_test['baseline_mse']:.5f}); "
          f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return result


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        sweep(args, extra)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
