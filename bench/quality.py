#!/usr/bin/env python
"""Quality of a training recipe: AE and VAE x recipe x seed, trained for N epochs, scored on test.

    python bench/quality.py                                   # synthetic 5,000 faces, both recipes, 3 seeds
    python bench/quality.py --seeds 0,1,2,3,4 --epochs 10     # docs/recipes.md's table
    python bench/quality.py --data shards/ --epochs 20 --models vae --recipes default
    python bench/quality.py --out runs/quality-w50 -- --warmup-steps 50     # args after -- go to train.py

Every run is fastceleba/train.py in its own process (OUT/<model>-<recipe>-seed<S>, with --resume, so an
interrupted benchmark continues where it stopped; a finished run is not trained again, and one finished
with other arguments or an older recipe stops the benchmark with exit 2 rather than pass as new) with
the cache loader, batch 128, no flips, on one process. With no --data it makes a synthetic CelebA of --synthetic
images once under --cache-dir (tools/make_synthetic.py, then tools/shard.py --size 64).

For every run it reads summary.json: test PSNR and the mean-image PSNR, the VAE's KL per image and active
latents, FID/KID of prior samples and reconstructions (fastceleba/fid.py; "–" where not computed), their
near-Nyquist energy against the test images' (HF ratio: 1 is as real faces, more is checkerboard or noise),
the dead-unit fraction of every ReLU layer, the health verdict, and the wall time of the process.
Writes OUT/quality.json (every run, and per model x recipe the mean, min, max and spread of each number)
and OUT/quality.md (the same as Markdown tables), and prints the tables.
Exit status: 0 done; 2 bad input or a run that failed; a run that diverged (train.py exit 3) is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastceleba.errors import DataError  # noqa: E402
from fastceleba.files import atomic_write, write_json  # noqa: E402
from fastceleba.recipe import RECIPES  # noqa: E402
from fastceleba.shards import load_manifest  # noqa: E402
# a sibling bench script (running one puts bench/ first on sys.path)
from loader import machine  # noqa: E402

TRAIN = ROOT / "fastceleba" / "train.py"
SECONDS = "bench_seconds.txt"  # a finished run's wall time, beside its summary.json
COMMAND = "bench_command.json"  # and the train.py arguments that made it
EXIT_DIVERGED = 3
NUMBERS = ("psnr", "baseline_psnr", "psnr_gain", "kld", "active_units", "seconds", "fid", "fid_recon", "kid",
           "rfd", "rfd_recon", "rkid", "hf_ratio", "hf_ratio_recon")
# summary.json's sample_quality (fastceleba/fid.py): FID/KID with the Inception weights, rfd/rkid with
# `-- --sample-features random-conv` (a random conv net: NOT FID); null where not computed
# hf_ratio: the samples' spectral energy share near Nyquist over the test images' (1: as real faces; a
# checkerboard or pixel noise raises it, blur lowers it), with any of the features above
QUALITY = ("fid", "fid_recon", "kid", "rfd", "rfd_recon", "rkid", "hf_ratio", "hf_ratio_recon")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="shard directory (tools/shard.py output); default: a synthetic set made once")
    p.add_argument("--synthetic", type=int, default=5000, help="images of the synthetic set (default %(default)s)")
    p.add_argument("--cache-dir", default="data/quality", help="where the synthetic set is kept (default %(default)s)")
    p.add_argument("--out", default="runs/quality", help="benchmark directory (default %(default)s)")
    p.add_argument("--models", default="ae,vae", help="comma-separated: ae, vae (default %(default)s)")
    p.add_argument("--recipes", default="default,notebook",
                   help=f"comma-separated recipes of train.py --recipe ({', '.join(RECIPES)}; default %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default %(default)s)")
    p.add_argument("--loader", default="cache", help="train.py --loader (default %(default)s)")
    p.add_argument("--pictures", action="store_true", help="let train.py write its PNGs (off by default)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables from the runs already finished in --out")
    args = p.parse_args(argv)

    def listing(flag: str, text: str, allowed=None, cast=str) -> list:
        try:
            items = [cast(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            p.error(f"--{flag}: not a comma-separated list: {text!r}")
        bad = [i for i in items if allowed is not None and i not in allowed]
        if not items or bad:
            p.error(f"--{flag}: expected a comma-separated list of {', '.join(allowed) if allowed else 'values'}, "
                    f"got {text!r}")
        return items

    args.models = listing("models", args.models, ("ae", "vae"))
    args.recipes = listing("recipes", args.recipes, tuple(RECIPES))
    args.seeds = listing("seeds", args.seeds, cast=int)
    if args.epochs < 1 or args.batch_size < 1 or args.synthetic < 10:
        p.error("--epochs and --batch-size must be >= 1, --synthetic >= 10")
    for flag in ("--model", "--recipe", "--seed", "--data", "--out", "--epochs", "--batch-size", "--loader"):
        if flag in extra:
            p.error(f"{flag} is set by the benchmark; leave it out of the arguments after --")
    return args, extra


def synthetic_shards(cache_dir: Path, num: int) -> Path:
    """A synthetic CelebA and its 64x64 shards under cache_dir, made once with the command-line tools."""
    src, shards = cache_dir / f"celeba-{num}", cache_dir / f"shards64-{num}"
    if not (src / "list_eval_partition.txt").is_file():
        print(f"[quality] generating {num} synthetic faces in {src} (once)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(src), "--num", str(num),
                        "--overwrite"], check=True)
    if not (shards / "manifest.json").is_file():
        print(f"[quality] sharding into {shards} (once)", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "shard.py"), str(src), str(shards), "--size", "64",
                        "--shard-size", "1000"], check=True)
    return shards


def finished_seconds(run: Path, train_args: list[str], env: dict | None = None) -> float | None:
    """The wall seconds of a train.py run into `run` that finished before with these arguments (benchmarks
    reuse it), else None. A finished run made with other arguments, another mixed precision or another
    recipe (the defaults in fastceleba/recipe.py changed since) is a DataError: reusing it would report
    the old setting under the new one's name."""
    seconds = run / SECONDS
    if not ((run / "summary.json").is_file() and seconds.is_file()):
        return None
    stored = json.loads((run / COMMAND).read_text()) if (run / COMMAND).is_file() else None
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    from fastceleba.recipe import recipe_from_args  # train.py's own parsing: importing it costs ~1 s
    from fastceleba.train import parse_args as train_parse_args
    recipe = recipe_from_args(train_parse_args([*train_args, "--out", str(run)])).as_dict()
    if stored != _command(train_args, env):
        why = "other train.py arguments" if stored else "an older benchmark (no " + COMMAND + ")"
    elif summary.get("recipe") != recipe:
        why = "an older version of its recipe"
    else:
        return float(seconds.read_text())
    raise DataError(f"{run}: finished with {why}; delete it (or choose another --out) to train it again")


def _command(train_args: list[str], env: dict | None) -> dict:
    """What decides a run's result besides the code: its arguments and Accelerate's mixed precision."""
    env = os.environ if env is None else env
    return {"args": list(train_args), "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION", "no")}


def timed_train(run: Path, train_args: list[str], tag: str, env: dict | None = None) -> tuple[int, float]:
    """One fastceleba/train.py process writing into `run`, its output hidden (its errors are not):
    (exit status, wall seconds: start-up to exit). A finished run's seconds and command are kept beside
    its summary (finished_seconds reads them)."""
    cmd = [sys.executable, str(TRAIN), "--out", str(run), *train_args]
    print(f"[{tag}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env).returncode
    seconds = time.perf_counter() - start
    if code == 0:
        write_json(run / COMMAND, _command(train_args, env))
        atomic_write(run / SECONDS, f"{seconds:.3f}\n")
    return code, seconds


def run_one(args: argparse.Namespace, data: Path, model: str, recipe: str, seed: int, extra: list[str]) -> dict:
    run = Path(args.out) / f"{model}-{recipe}-seed{seed}"
    row = {"model": model, "recipe": recipe, "seed": seed, "run": str(run)}
    summary_path = run / "summary.json"
    train_args = ["--model", model, "--recipe", recipe, "--seed", str(seed), "--data", str(data), "--epochs",
                  str(args.epochs), "--batch-size", str(args.batch_size), "--loader", args.loader, "--resume",
                  *([] if args.pictures else ["--no-pictures"]), *extra]
    seconds = finished_seconds(run, train_args)
    if seconds is not None:
        print(f"[quality] {run}: done already", flush=True)
    elif args.report_only:
        return {**row, "status": "not run"}
    else:
        code, seconds = timed_train(run, train_args, "quality")
        if code == EXIT_DIVERGED:
            return {**row, "status": "diverged"}
        if code != 0:
            raise DataError(f"{run}: train.py exited with status {code} (its message is above); fix it and re-run, "
                            "finished runs are kept")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    test = summary.get("test") or {}
    if not test.get("num_samples"):
        raise DataError(f"{summary_path}: no test metrics; the shards need a test split")
    return {**row, "status": "ok", "seconds": seconds, "psnr": test["psnr"], "baseline_psnr": test["baseline_psnr"],
            "psnr_gain": test["psnr_gain"], "kld": test.get("kld"), "active_units": test.get("active_units"),
            "latent_dim": test.get("latent_dim"), "dead_fraction": test.get("dead_fraction", {}),
            "collapsed": summary["health"]["collapsed"], "problems": summary["health"]["problems"],
            **{k: (summary.get("sample_quality") or {}).get(k) for k in QUALITY}}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, recipe): mean, min, max of each number over seeds, and the layer with most dead units."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["recipe"]), []).append(r)
    out = []
    for (model, recipe), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        group = [r for r in group if r["status"] != "not run"]
        if not group:
            continue
        entry = {"model": model, "recipe": recipe, "seeds": len(group), "ok": len(ok),
                 "collapsed": sum(r["collapsed"] for r in ok)}
        for key in NUMBERS:
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                              "spread": max(values) - min(values)}
        layers = ok[0]["dead_fraction"].keys() if ok else []
        entry["dead_fraction_max"] = {n: max(r["dead_fraction"][n] for r in ok) for n in layers}
        out.append(entry)
    return out


def markdown(rows: list[dict], summary: list[dict], info: dict) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    # the sample distances of these runs: FID/KID, else the random-feature stand-ins, named as what they are
    fd = next((k for k in ("fid", "rfd") if any(r.get(k) is not None for r in rows)), "fid")
    kd = {"fid": "kid", "rfd": "rkid"}[fd]
    FD, KD = {"fid": ("FID", "KID"), "rfd": ("rFD (random features, not FID)", "rKID")}[fd]

    def pair(r: dict, a: str, b: str, scale: float = 1.0) -> str:
        return "–" if r.get(a) is None else f"{scale * r[a]:.2f} / {num(r.get(b) and scale * r[b], '.2f')}"

    m = info["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}; "
             f"{info['epochs']} epochs, batch {info['batch_size']}, loader {info['loader']}", "",
             "| model | recipe | seed | test PSNR | mean-image PSNR | KL/image | active latents "
             f"| {FD} samples / recon | {KD} x1000 samples | HF ratio samples / recon | dead % per ReLU layer "
             "| collapsed | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if r["status"] == "not run":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['recipe']} | {r['seed']} | {r['status']} | | | | | | | | | |")
            continue
        dead = " ".join(f"{n} {100 * f:.0f}" for n, f in r["dead_fraction"].items())
        active = f"{r['active_units']}/{r['latent_dim']}" if r.get("active_units") is not None else "–"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['seed']} | {r['psnr']:.2f} | {r['baseline_psnr']:.2f} | "
                     f"{num(r.get('kld'), '.1f')} | {active} | {pair(r, fd, fd + '_recon')} | "
                     f"{num(r.get(kd) and 1000 * r[kd], '.2f')} | {pair(r, 'hf_ratio', 'hf_ratio_recon')} | "
                     f"{dead} | {'yes' if r['collapsed'] else 'no'} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "| model | recipe | runs | test PSNR mean (min – max) | spread | KL/image mean "
              f"| active latents min | {FD} samples mean | HF ratio samples mean (max) | worst dead % (layer) "
              "| collapsed runs |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for s in summary:
        p = s.get("psnr")
        worst = max(s["dead_fraction_max"].items(), key=lambda kv: kv[1], default=None)
        lines.append(
            f"| {s['model']} | {s['recipe']} | {s['ok']}/{s['seeds']} | "
            + (f"{p['mean']:.2f} ({p['min']:.2f} – {p['max']:.2f}) | {p['spread']:.2f}" if p else "– | –")
            + f" | {num(s.get('kld', {}).get('mean'), '.1f')} | {num(s.get('active_units', {}).get('min'), '.0f')} | "
            + f"{num(s.get(fd, {}).get('mean'), '.2f')} | "
            + (f"{s['hf_ratio']['mean']:.2f} ({s['hf_ratio']['max']:.2f}) | " if s.get("hf_ratio") else "– | ")
            + (f"{100 * worst[1]:.0f} ({worst[0]})" if worst else "–") + f" | {s['collapsed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        data = Path(args.data) if args.data else synthetic_shards(Path(args.cache_dir), args.synthetic)
        load_manifest(data)  # a clear error before any training starts
        rows = [run_one(args, data, m, r, s, extra) for m in args.models for r in args.recipes for s in args.seeds]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    out = Path(args.out)
    info = {"machine": machine(), "data": str(data), "epochs": args.epochs, "batch_size": args.batch_size,
            "loader": args.loader, "train_args": extra}
    write_json(out / "quality.json", {**info, "runs": rows, "summary": summary})
    text = markdown(rows, summary, info)
    atomic_write(out / "quality.md", text)
    print(text + f"[quality] wrote {out / 'quality.json'} and {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
