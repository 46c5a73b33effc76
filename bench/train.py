#!/usr/bin/env python
"""Training speed of the notebook's AE and VAE: images/s per optimizer step, and how long steps wait on data.

    python bench/train.py                          # everything, on a synthetic CelebA made on first use
    python bench/train.py --quick                  # a smaller, faster pass (fewer steps and feeds)
    python bench/train.py --data shards/ --raw shards64/ --json runs/bench_train.json

Two sections, both with the training step of fastceleba/train.py (forward, the notebook's loss, backward,
Adam) at --batch-size (default 128, the notebook's):

1. compute: batches already in memory on the device, for each model x {channels-last weights and batches
   (train.py's default), PyTorch's default contiguous layout (--no-channels-last)} x {eager, torch.compile}
   x {fp32, bf16 autocast (what `accelerate launch --mixed_precision bf16` does)}. After --warmup steps
   (which include compilation), --repeats timed runs of --steps steps; the runs of all configurations are
   interleaved round-robin so that load from other processes hits them alike. Reported: median images/s
   (min..max), the compiled/eager ratio and the channels-last/contiguous ratio.
2. fed: the same step fed by each loader (fastceleba.loaders, shuffled, drop_last, as in training), each
   in a fresh process, against a "memory" feed measured the same way. Per step, the time blocked in
   next(loader) is data wait; reported: images/s and data wait as a fraction of step time (medians).

Both set the kernels train.py sets (fastceleba.runtime.set_backends: on CUDA cuDNN's autotuner and TF32;
recorded as "kernels"). On a GPU (CUDA available) both sections run on it and synchronise only around a
timed run, as train.py lets the CPU queue the next step while the GPU runs this one. The machine
(CPU model, cores, GPU, load average at start) is part of the table and of the --json output.
With no --data, the synthetic CelebA and its shards are bench/loader.py's (made once under --cache-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate.utils import convert_outputs_to_fp32  # noqa: E402

from fastceleba.errors import DataError  # noqa: E402
from fastceleba.models import build_model  # noqa: E402
from fastceleba.files import write_json  # noqa: E402
from fastceleba.runtime import set_backends  # noqa: E402
from fastceleba.train import make_loss_fn  # noqa: E402
# a sibling bench script (running one puts bench/ first on sys.path): machine() and the synthetic shards
import loader as loader_bench  # noqa: E402

FEEDS = ["memory", "cache:rgb", "cache:jpg", "dali:rgb", "dali:jpg", "turbo:jpg", "wds:jpg", "pil"]
QUICK_FEEDS = ["memory", "cache:rgb", "dali:jpg", "turbo:jpg"]
LAYOUTS = ("channels_last", "contiguous")


class Step:
    """One configuration's model, optimizer and training step, built as fastceleba/train.py builds them."""

    def __init__(self, model: str, compiled: bool, bf16: bool, device: torch.device, seed: int = 0,
                 channels_last: bool = True):
        torch.manual_seed(seed)
        self.device, self.channels_last = device, channels_last
        self.model = build_model(model).to(device)
        if channels_last:  # as train_setup.py: the weights, then each batch in train_one_epoch
            self.model = self.model.to(memory_format=torch.channels_last)
        if bf16:  # what Accelerator.prepare does for mixed_precision="bf16": autocast forward, fp32 outputs
            autocast = torch.autocast(device.type, dtype=torch.bfloat16)
            self.model.forward = convert_outputs_to_fp32(autocast(self.model.forward))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = make_loss_fn(self.model, model, "image", compile=compiled)
        self.beta = torch.tensor(1.0, device=device)

    def __call__(self, x: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, _ = self.loss_fn(x, self.beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work: at the edges of a timed run only (a sync per step, which train.py
    does not do, would keep the CPU from queuing step N+1 while step N runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_batches(device: torch.device, batch_size: int, count: int = 4) -> list[torch.Tensor]:
    """A few batches already on the device (uniform noise in [0, 1]: the step's cost does not depend on it)."""
    g = torch.Generator().manual_seed(0)
    return [torch.rand(batch_size, 3, 64, 64, generator=g).to(device) for _ in range(count)]


def summarize(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def compute_section(args: argparse.Namespace, device: torch.device) -> list[dict]:
    configs = [(m, lay, c, b) for m in args.models for lay in args.layouts for c in args.modes
               for b in args.precisions]
    batches = memory_batches(device, args.batch_size)
    steps = {}
    for model, layout, mode, prec in configs:
        print(f"warming up {model} {layout} {mode} {prec} ...", file=sys.stderr, flush=True)
        step = Step(model, mode == "compiled", prec == "bf16", device, channels_last=layout == "channels_last")
        start = time.perf_counter()
        for i in range(args.warmup):
            step(batches[i % len(batches)])
        sync(device)
        steps[(model, layout, mode, prec)] = (step, time.perf_counter() - start)
    rates: dict = {key: [] for key in steps}
    for r in range(args.repeats):  # round-robin: a burst of outside load hits every configuration
        for key, (step, _) in steps.items():
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(batches[i % len(batches)])
            sync(device)
            rates[key].append(args.steps * args.batch_size / (time.perf_counter() - start))
    return [{"model": m, "layout": lay, "mode": c, "precision": p, "warmup_s": steps[(m, lay, c, p)][1],
             **summarize(rates[(m, lay, c, p)])} for m, lay, c, p in configs]


def run_fed(spec: dict) -> dict:
    """One feed (in its own process): median images/s and data-wait fraction of the training step."""
    from fastceleba.loaders import make_loader

    device = torch.device(spec["device"])
    kernels = set_backends(deterministic=False, cuda=device.type == "cuda")  # a fresh process: set them again
    step = Step(spec["model"], spec["mode"] == "compiled", spec["precision"] == "bf16", device,
                channels_last=spec["layout"] == "channels_last")
    kind, _, member = spec["feed"].partition(":")
    setup = time.perf_counter()
    if kind == "memory":
        batches = memory_batches(device, spec["batch_size"])

        def stream():
            while True:
                yield from ({"image": x} for x in batches)
    else:
        loader = make_loader(kind, spec["data_rgb"] if member == "rgb" else spec["data"], "train",
                             spec["batch_size"], device=device, shuffle=True, drop_last=True,
                             num_workers=spec["workers"], progress=False,
                             **({"member": member} if kind != "pil" else {}))

        def stream():
            while True:  # epoch after epoch; starting an epoch counts as data wait
                yield from loader
    setup = time.perf_counter() - setup
    it = stream()

    def run(n: int) -> tuple[float, float]:
        wait = 0.0
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            batch = next(it)  # what train.py's loop blocks on (the GPU may still run earlier steps)
            wait += time.perf_counter() - t
            step(batch["image"])
        sync(device)
        total = time.perf_counter() - start
        return n * spec["batch_size"] / total, wait / total

    run(spec["warmup"])
    results = [run(spec["steps"]) for _ in range(spec["repeats"])]
    return {"feed": spec["feed"], "kernels": kernels, "setup_s": setup, **summarize([r for r, _ in results]),
            "data_wait": statistics.median([w for _, w in results]), "data_wait_runs": [w for _, w in results]}


def fed_in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"feed": spec["feed"], "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']}, "
             f"load average at start {m['load_avg_at_start']}",
             f"device {report['device']}, batch {report['batch_size']}, {report['repeats']} runs x "
             f"{report['steps']} steps after {report['warmup']} warm-up steps; images/s median (min..max); "
             f"kernels: {report['kernels']}", ""]
    comp = report["compute"]
    if comp:
        lines.append("compute (batches already in memory):")
        lines.append(f"{'model':6} {'layout':13} {'mode':9} {'precision':9} {'images/s':>26}  vs eager  "
                     "vs contiguous")
        eager = {(r["model"], r["layout"], r["precision"]): r["median"] for r in comp if r["mode"] == "eager"}
        plain = {(r["model"], r["mode"], r["precision"]): r["median"] for r in comp if r["layout"] == "contiguous"}
        for r in comp:
            ref = eager.get((r["model"], r["layout"], r["precision"]))
            ratio = f"x{r['median'] / ref:.2f}" if ref else ""
            ref = plain.get((r["model"], r["mode"], r["precision"]))
            vs_plain = f"x{r['median'] / ref:.2f}" if ref else ""
            lines.append(f"{r['model']:6} {r['layout']:13} {r['mode']:9} {r['precision']:9} "
                         f"{r['median']:9.0f} ({r['min']:6.0f}..{r['max']:6.0f})  {ratio:8}  {vs_plain}")
        lines.append("")
    fed = report["fed"]
    if fed:
        cfg = report["fed_config"]
        lines.append(f"fed by loaders ({cfg['model']}, {cfg['layout']}, {cfg['mode']}, {cfg['precision']}, "
                     f"{report['workers']} workers):")
        lines.append(f"{'feed':10} {'images/s':>26} {'data wait':>10} {'vs memory':>10}")
        mem = next((r["median"] for r in fed if r.get("feed") == "memory" and "median" in r), None)
        for r in fed:
            if "error" in r:
                lines.append(f"{r['feed']:10} error: {r['error']}")
                continue
            vs = f"{r['median'] / mem:.2f}" if mem else ""
            lines.append(f"{r['feed']:10} {r['median']:9.0f} ({r['min']:6.0f}..{r['max']:6.0f}) "
                         f"{100 * r['data_wait']:9.1f}% {vs:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ae,vae", help="comma list of models (default ae,vae)")
    p.add_argument("--modes", default="eager,compiled", help="comma list: eager, compiled (default both)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32, bf16 (default both)")
    p.add_argument("--layouts", default="channels_last,contiguous",
                   help="comma list: channels_last (train.py's default), contiguous (--no-channels-last) "
                        "(default both)")
    p.add_argument("--feeds", default=None, help=f"comma list of memory, KIND or KIND:MEMBER, or 'none' "
                   f"(default {','.join(FEEDS)})")
    p.add_argument("--fed-model", default="vae", help="model of the fed section (default vae)")
    p.add_argument("--fed-mode", default="eager", help="eager or compiled for the fed section (default eager)")
    p.add_argument("--fed-precision", default="fp32", help="fp32 or bf16 for the fed section (default fp32)")
    p.add_argument("--fed-layout", default="channels_last", choices=LAYOUTS,
                   help="memory layout of the fed section (default channels_last, train.py's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, the notebook's)")
    p.add_argument("--steps", type=int, default=8, help="steps per timed run (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--workers", type=int, default=2, help="loader workers/threads (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="3 runs x 4 steps, feeds " + ",".join(QUICK_FEEDS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--data", type=Path, help="JPEG shard directory (default: bench/loader.py's synthetic shards)")
    p.add_argument("--raw", type=Path, help="raw 64x64 shard directory for KIND:rgb feeds (default: --data or "
                   "the synthetic raw shards)")
    p.add_argument("--synthetic", type=int, default=5000, help="images of the synthetic CelebA (default 5000)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "bench",
                   help="where the synthetic data lives (default ./data/bench, shared with bench/loader.py)")
    p.add_argument("--json", type=Path, default=Path("runs/bench/train.json"),
                   help="write the report as JSON here (default runs/bench/train.json)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for the 1-minute load average to fall below 0.5 (default 0)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one feed, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_fed(json.loads(args.one))))
        return 0
    if args.quick:
        args.repeats, args.steps = min(args.repeats, 3), min(args.steps, 4)
        args.feeds = args.feeds or ",".join(QUICK_FEEDS)
    args.models, args.modes = args.models.split(","), args.modes.split(",")
    args.precisions, args.layouts = args.precisions.split(","), args.layouts.split(",")
    if not set(args.layouts) <= set(LAYOUTS):
        p.error(f"--layouts: each of {', '.join(LAYOUTS)}")
    feeds = [] if args.feeds == "none" else (args.feeds.split(",") if args.feeds else FEEDS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernels = set_backends(deterministic=False, cuda=device.type == "cuda")
    try:
        if any(f != "memory" for f in feeds):
            if args.data is None:
                data, raw = loader_bench.prepare_data(args.cache_dir, args.synthetic)
                raw = args.raw or raw
            else:
                data, raw = args.data, args.raw or args.data
        else:
            data = raw = None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.wait_idle
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:  # other work would skew the timings
        time.sleep(5)
    report = {"machine": loader_bench.machine(), "device": str(device), "batch_size": args.batch_size,
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "workers": args.workers,
              "torch_threads": torch.get_num_threads(), "kernels": kernels,
              "command": " ".join(["bench/train.py"] + sys.argv[1:] if argv is None else argv)}
    report["compute"] = compute_section(args, device) if args.modes and args.precisions else []
    report["fed_config"] = {"model": args.fed_model, "layout": args.fed_layout, "mode": args.fed_mode,
                            "precision": args.fed_precision}
    report["fed"] = []
    for feed in feeds:
        print(f"feeding from {feed} ...", file=sys.stderr, flush=True)
        report["fed"].append(fed_in_subprocess({
            "feed": feed, "device": str(device), "model": args.fed_model, "mode": args.fed_mode,
            "precision": args.fed_precision, "layout": args.fed_layout, "batch_size": args.batch_size,
            "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "workers": args.workers,
            "data": str(data), "data_rgb": str(raw)}))
    report["machine"]["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    print(table(report))
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
