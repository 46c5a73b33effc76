#!/usr/bin/env python
"""Verify every GPU path of fastceleba in one command; write one JSON report and print a table.

    python bench/gpu_check.py                  # everything this machine can run (report: runs/gpu_check/report.json)
    python bench/gpu_check.py --quick          # smaller data, fewer steps, within --budget 540 s
    python bench/gpu_check.py --budget 540     # the items in order of value, as many as fit in 540 s
    python bench/gpu_check.py --list           # the items in order, what each needs, estimated seconds
    python bench/gpu_check.py --only 'train:*,loader:*'

Everything is driven from outside, through the toolkit's public entry points, each in its own
process: tools/make_synthetic.py and tools/shard.py make a small synthetic CelebA twice sharded
(JPEG only, so DALI decodes the `jpg` member with nvJPEG ("mixed"); and with --size 64 for the
raw path); pytest runs the tests that skip themselves without a GPU; bench/loader.py runs every
loader with --device cuda; `accelerate launch fastceleba/train.py` trains the AE and the VAE for
a few steps in fp32, fp16 and bf16, eager and --compile, resumes an fp16 run (GradScaler and
scaler.pt), and with two or more GPUs trains over NCCL and checks that the replicas end
identical and every valid/test image is evaluated once; make_loader(..., device="cuda") of every
kind is compared image by image with the same loader on the CPU and with the pil baseline.

The items run in order of value (CUDA, the data, every loader on cuda with DALI mixed first, a bf16
and an fp16 VAE run, one --compile run, the fp16 resume, then the rest). Each ends passed, failed
(with the last error line; the full output is in OUT/logs/), skipped (with the reason: no CUDA
device, needs >= 2 GPUs, DALI not installed, ...) or "not run: budget" (--budget). The report is
rewritten after every item, so a run killed at a time limit leaves it complete ("running" names
the item it was killed in). Without a GPU the GPU items are skipped and a few CPU items (data, the
DALI CPU pipeline, a 2-step training, bench/loader.py, finding the GPU-only tests) still exercise
the harness. Attach OUT/report.json (and OUT/logs/ for a failed item) to any bug report.

On a machine with a GPU where DALI, simplejpeg or webdataset does not import, the report
("not_a_pass") and the table say so first and the exit status is 3, however the items end: the
default GPU loader would be untested. It runs on the interpreter it is started with (no make, no
venv): bring those as wheels, see docs/gpus.md.

Exit status: 0 nothing failed, 1 at least one item failed, 2 bad usage, 3 not a pass (a GPU
without DALI, simplejpeg or webdataset).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# the harness is this script's sibling (bench/ is first on sys.path when this runs, or is a pytest plugin)
from gpucheck_harness import (ROOT, Check, Failure, Item, Skip, build_report, environment, last_error_line,
                              parse_args, print_summary, result_line, run_items, save_report, select, torch_facts)

SCRIPT = Path(__file__).resolve()
TOL = 2 / 255  # the loaders' contract: mean absolute difference per image against pil (docs/loaders.md)

# The code paths issue 11 section 1 names: key -> what it is. Every key is covered by some item.
PATHS = {
    "gpu-tests": "the test suite's GPU-only tests (they skip without a GPU)",
    "bench-loader-gpu": "bench/loader.py on the GPU: DALI mixed, the cache on the device",
    "pinned-copy": "moving batches to the GPU through pinned memory, non-blocking (turbo, wds, pil)",
    "pin-memory": "DataLoader pin_memory (pil, wds)",
    "cache-device-epoch": "the cache's epoch on the device: index_select, flip, float conversion",
    "dali-mixed": "the DALI mixed (nvJPEG) graph and iterator on the jpg member",
    "dali-gpu-raw": "the DALI GPU graph on raw rgb shards",
    "dali-device-id": "DALI on a device other than cuda:0",
    "default-loader": "train.py's default loader on a GPU (dali where installed)",
    "fp32": "CUDA training in fp32",
    "fp16": "CUDA training under fp16 autocast with the GradScaler",
    "bf16": "CUDA training under bf16 autocast",
    "compile": "--compile under Inductor/Triton on the GPU",
    "channels-last": "channels-last weights and batches (train.py's default) under cuDNN",
    "fp16-scaler-resume": "an fp16 checkpoint's scaler.pt saved, then --resume",
    "cuda-autocast-eval": "CUDA autocast in evaluation and pictures",
    "cuda-generators": "CUDA generators in metrics, pictures and sampling",
    "ae": "the autoencoder on the GPU",
    "vae": "the VAE on the GPU",
    "nccl": "several processes over NCCL instead of gloo",
    "ddp-replicas": "replicas identical after a multi-GPU run",
    "ddp-eval-once": "every valid/test image evaluated exactly once across GPUs",
}


# ---------------------------------------------------------------------------------------------------- the items
def env_cuda(chk: Check) -> dict:
    """CUDA works: a matmul on every GPU. Failed when nvidia-smi sees GPUs but torch cannot use them."""
    t = chk.env["torch"]
    smi_gpus = chk.env.get("nvidia_smi", {}).get("gpus") or []
    if t.get("probe_error"):
        raise Failure(f"asking torch about CUDA crashed or hung: {t['probe_error']}")
    if not chk.cuda:
        if smi_gpus:
            warn = "; ".join(t["cuda_warnings"]) or "torch.cuda.is_available() is False"
            raise Failure(f"nvidia-smi lists {len(smi_gpus)} GPU(s) (driver {chk.env.get('driver_version')}) but "
                          f"torch {t['version']} (CUDA {t['cuda_build']}) cannot use them: {warn}")
        raise Skip(f"no CUDA device (torch {t['version']}, built for CUDA {t['cuda_build']}; no nvidia-smi)")
    code = ("import torch\n"
            "for i in range(torch.cuda.device_count()):\n"
            "    a = torch.randn(512, 512, device=f'cuda:{i}')\n"
            "    ref = a.cpu() @ a.cpu()\n"
            "    assert ((a @ a).cpu() - ref).norm() < 1e-2 * ref.norm(), i  # fp32 or TF32\n"
            "print('ok', torch.cuda.device_count())\n")
    chk.sh(chk.python("-c", code))
    return {"gpus": [d["name"] for d in t["devices"]], "driver": chk.env.get("driver_version")}


def data_synthetic(chk: Check) -> dict:
    if chk.data.exists():
        shutil.rmtree(chk.data)
    chk.sh(chk.python("tools/make_synthetic.py", chk.celeba, "--num", chk.args.images, "--no-progress"))
    return {"images": chk.args.images, "dir": str(chk.celeba)}


def data_shards(jpeg_only: bool) -> Callable[[Check], dict]:
    def run(chk: Check) -> dict:
        out = chk.jpg if jpeg_only else chk.rgb
        extra = [] if jpeg_only else ["--size", "64"]
        shard_size = max(50, chk.args.images // 8)  # several shards per split
        chk.sh(chk.python("tools/shard.py", chk.celeba, out, *extra, "--shard-size", shard_size,
                          "--workers", min(2, os.cpu_count() or 1), "--no-progress"))
        manifest = json.loads((out / "manifest.json").read_text())
        members = sorted(manifest["members"])
        raw = manifest.get("raw_member")  # the raw 64x64 member's name (rgb8; rgb in v1 shards)
        if jpeg_only and raw in members:
            raise Failure(f"{out}: JPEG-only shards carry a raw member; DALI would not decode")
        if not jpeg_only and raw not in members:
            raise Failure(f"{out}: --size 64 shards have no raw member")
        return {"dir": str(out), "members": members,
                "splits": {s: v["num_samples"] for s, v in manifest["splits"].items()}}
    return run


def gpu_tests(collect_only: bool) -> Callable[[Check], dict]:
    """The tests that skip themselves without a GPU, chosen by this file acting as a pytest plugin."""
    def run(chk: Check) -> dict:
        xml = chk.out / "pytest-gpu.xml"
        xml.unlink(missing_ok=True)
        cmd = chk.python("-m", "pytest", "-p", "gpucheck_harness", "-q", "-rs", "-p", "no:cacheprovider",
                         "--basetemp", chk.out / "pytest-tmp", f"--junitxml={xml}", "tests")
        if collect_only:
            cmd.insert(cmd.index("-q"), "--collect-only")
        listed = chk.out / "pytest-gpu-selected.txt"
        listed.unlink(missing_ok=True)
        rc, text = chk.sh(cmd, check=False, env={"GPU_CHECK_SELECT": str(listed)}, path=[ROOT / "bench"])
        selected = listed.read_text().splitlines() if listed.is_file() else []
        if collect_only:
            if rc != 0:
                raise Failure(f"pytest --collect-only exit status {rc}: {last_error_line(text)}")
            if not selected:
                raise Failure("found no test that skips without a GPU (skipif reason naming GPU/CUDA)")
            return {"gpu_tests": selected}
        import xml.etree.ElementTree as ET

        if rc == 5 or not xml.is_file():
            raise Failure(f"pytest exit status {rc}: {last_error_line(text)}")
        cases = ET.parse(xml).getroot().iter("testcase")
        status = {}
        for c in cases:
            name = f"{c.get('classname')}::{c.get('name')}"
            kids = {k.tag: k for k in c}
            if "failure" in kids or "error" in kids:
                status[name] = "failed"
            elif "skipped" in kids:
                status[name] = "skipped: " + (kids["skipped"].get("message") or "")[:200]
            else:
                status[name] = "passed"
        failed = [n for n, s in status.items() if s == "failed"]
        passed = [n for n, s in status.items() if s == "passed"]
        if failed:
            raise Failure(f"{len(failed)} of {len(status)} GPU tests failed: {', '.join(failed)[:400]}")
        if rc != 0:
            raise Failure(f"pytest exit status {rc}: {last_error_line(text)}")
        if not passed:
            raise Failure(f"all {len(status)} GPU tests skipped on a machine with CUDA")
        return {"tests": status}
    return run


def bench_loader(device: str) -> Callable[[Check], dict]:
    def run(chk: Check) -> dict:
        q = chk.args.quick
        if device == "cuda":
            loaders = ["pil", "dali:jpg", "dali:rgb", "cache:jpg", "cache:rgb", "turbo:jpg", "wds:jpg"]
            if not chk.dali:
                loaders = [n for n in loaders if not n.startswith("dali")]
            images, repeats, warmup = (256, 1, 1) if q else (min(chk.split_sizes()["train"], 2000), 3, 1)
        else:  # the harness on a CPU: two loaders, one short pass
            loaders, images, repeats, warmup = ["cache:rgb"], 64, 1, 0
        out = chk.out / f"bench-loader-{device}"
        chk.sh(chk.python("bench/loader.py", "--data", chk.jpg, "--raw", chk.rgb, "--device", device,
                          "--loaders", ",".join(loaders), "--images", images, "--repeats", repeats,
                          "--warmup", warmup, "--workers", chk.args.workers, "--json", out / "loader.json",
                          "--csv", out / "loader.csv", "--png", out / "loader.png"))
        report = json.loads((out / "loader.json").read_text())
        errors = [f"{r['loader']}: {r['error']}" for r in report["results"] if "error" in r]
        if errors:
            raise Failure("; ".join(errors)[:500])
        wrong = [r["loader"] for r in report["results"] if not r["device"].startswith(device)]
        if wrong:
            raise Failure(f"loaders not on {device}: {', '.join(wrong)}")
        return {"json": str(out / "loader.json"),
                "images_per_s": {r["loader"]: round(r["median"]) for r in report["results"]},
                "peak_rss_mb": {r["loader"]: round(r["peak_rss_mb"]) for r in report["results"]},
                "setup_s": {r["loader"]: round(r["setup_s"], 2) for r in report["results"]},
                # every loader at --workers: DALI took all the cores before (issue 17, defect 2)
                "workers": {r["loader"]: f"{r['workers']} {r['workers_are']}" for r in report["results"]}}
    return run


def probe_spec(chk: Check, kind: str, member: str, device: str, flip: bool, against_self: bool = True) -> dict:
    data = chk.rgb if member == "rgb" else chk.jpg
    return {"kind": kind, "member": member, "device": device, "flip": flip, "data": str(data), "split": "valid",
            "batch_size": 16, "workers": chk.args.workers, "against_self": against_self}


def loader_probe(kind: str, member: str, device: str, flip: bool) -> Callable:
    def run(chk: Check) -> dict:
        return chk.probe(probe_spec(chk, kind, member, device, flip))
    return run


def cpu_loaders(chk: Check) -> dict:
    """The probe harness on the CPU: the DALI CPU pipeline (if installed) and the cache with flips, vs pil."""
    specs = [probe_spec(chk, "cache", "jpg", "cpu", True, against_self=False)]
    if chk.dali:
        specs.insert(0, probe_spec(chk, "dali", "jpg", "cpu", False, against_self=False))
    results = chk.probe(specs)
    return {f"{r['kind']}-{r['device']}": r for r in results}


def train_run(model: str, precision: str, compile: bool) -> Callable[[Check], dict]:
    def run(chk: Check) -> dict:
        name = f"{model}-{precision}" + ("-compile" if compile else "")
        out = chk.runs / name
        shutil.rmtree(out, ignore_errors=True)
        acc = {"fp32": "no"}.get(precision, precision)
        cmd = chk.launch(acc) + ["fastceleba/train.py", "--model", model, "--data", chk.jpg, "--out", out,
                                 "--max-steps", chk.args.steps, "--batch-size", chk.args.batch_size,
                                 "--workers", chk.args.workers, "--attr-images", 256]
        if compile:
            cmd.append("--compile")  # no --loader: train.py's default choice on a GPU is part of the check
        _, text = chk.sh(cmd)
        return check_summary(chk, out, text, model, acc, steps=chk.args.steps, processes=1)
    return run


def check_summary(chk: Check, out: Path, text: str, model: str, precision: str, steps: int,
                  processes: int, loader: str | None = None) -> dict:
    import math

    summary = json.loads((out / "summary.json").read_text())
    sizes = chk.split_sizes()
    want_device = "cuda" if chk.cuda else "cpu"
    problems = []
    if not str(summary["device"]).startswith(want_device):
        problems.append(f"trained on {summary['device']}, not {want_device}")
    if summary["mixed_precision"] != precision:
        problems.append(f"mixed precision {summary['mixed_precision']}, not {precision}")
    if summary["steps"] != steps:
        problems.append(f"{summary['steps']} steps, not {steps}")
    if summary["num_processes"] != processes:
        problems.append(f"{summary['num_processes']} processes, not {processes}")
    expected_loader = loader or ("dali" if chk.cuda and chk.dali else "cache")
    if summary["args"]["loader"] != expected_loader:
        problems.append(f"loader {summary['args']['loader']}, expected the default {expected_loader}")
    for split in ("valid", "test"):
        m = summary.get(split) or {}
        if m.get("num_samples") != sizes[split]:
            problems.append(f"{split}: {m.get('num_samples')} images evaluated, the split has {sizes[split]}")
        elif not all(math.isfinite(m[k]) for k in ("mse", "psnr")):
            problems.append(f"{split}: metrics not finite: mse {m['mse']} psnr {m['psnr']}")
    want_pictures = {"reconstructions.png"} | ({"samples.png", "interpolation.png"} if model == "vae" else set())
    if summary.get("pictures") is not None and not want_pictures <= set(summary["pictures"]):
        problems.append(f"pictures {summary['pictures']}, expected at least {sorted(want_pictures)}")
    if problems:
        raise Failure("; ".join(problems))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"device": summary["device"], "mixed_precision": precision, "loader": summary["args"]["loader"],
            "steps": summary["steps"], "test_psnr": round(summary["test"]["psnr"], 2),
            # a few steps after the first (start-up, compilation: first_step_seconds): a smoke figure
            "images_per_s": round(rows[-1]["images_per_s"]) if rows else None,
            "first_step_seconds": rows[-1].get("first_step_seconds") if rows else None,
            "scaler_skipped_steps": summary.get("scaler_skipped_steps"),
            "test_mse": summary["test"]["mse"], "pictures": summary.get("pictures"), "out": str(out)}


def fp16_resume(chk: Check) -> dict:
    out = chk.runs / "vae-fp16-resume"
    shutil.rmtree(out, ignore_errors=True)
    bs = chk.args.batch_size
    per_epoch = chk.split_sizes()["train"] // bs
    common = ["fastceleba/train.py", "--model", "vae", "--data", chk.jpg, "--out", out, "--batch-size", bs,
              "--workers", chk.args.workers, "--no-pictures"]
    chk.sh(chk.launch("fp16") + common + ["--epochs", 1, "--no-test"])
    ckpt = out / "checkpoints" / "epoch_1"
    if not (ckpt / "scaler.pt").is_file():
        raise Failure(f"{ckpt} has no scaler.pt after an fp16 epoch: {sorted(p.name for p in ckpt.iterdir())}")
    _, text = chk.sh(chk.launch("fp16") + common + ["--epochs", 2, "--resume", "--max-steps", per_epoch + 2])
    if "resuming from" not in text:
        raise Failure("the second run did not say 'resuming from'")
    return check_summary(chk, out, text, "vae", "fp16", steps=per_epoch + 2, processes=1)


def ddp_run(loader: str | None, precision: str) -> Callable[[Check], dict]:
    def run(chk: Check) -> dict:
        n = chk.args.ddp_processes
        if chk.gpus < n:
            raise Skip(f"--ddp-processes {n} needs {n} GPUs (found {chk.gpus})")
        out = chk.runs / f"ddp{n}-{loader or 'default'}-{precision}"
        shutil.rmtree(out, ignore_errors=True)
        bs = chk.args.batch_size
        cmd = chk.launch({"fp32": "no"}.get(precision, precision), processes=n) + [
            SCRIPT, "--rank-hash", "--model", "vae", "--data", chk.jpg, "--out", out, "--epochs", 1,
            "--batch-size", bs, "--workers", chk.args.workers, "--attr-images", 256, "--flip"]
        if loader:
            cmd += ["--loader", loader]
        _, text = chk.sh(cmd)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
        if len(ranks) != n:
            raise Failure(f"{len(ranks)} of {n} ranks wrote their weight hash")
        problems = []
        if len({r["sha256"] for r in ranks}) != 1:
            problems.append("replicas differ after training: " + ", ".join(r["sha256"][:12] for r in ranks))
        if {r["backend"] for r in ranks} != {"nccl"}:
            problems.append(f"backend {sorted({str(r['backend']) for r in ranks})}, not nccl")
        if len({r["device"] for r in ranks}) != n:
            problems.append(f"ranks share devices: {[r['device'] for r in ranks]}")
        if problems:
            raise Failure("; ".join(problems))
        steps = chk.split_sizes()["train"] // n // bs
        details = check_summary(chk, out, text, "vae", {"fp32": "no"}.get(precision, precision), steps=steps,
                                processes=n, loader=loader)
        details.update(backend="nccl", devices=[r["device"] for r in ranks], replica_sha256=ranks[0]["sha256"])
        return details
    return run


# The order of value, for a machine lent for minutes (--budget): CUDA itself, the data, every loader on
# cuda against the CPU and pil (DALI mixed, the default GPU loader, first), a short bf16 and fp16 VAE
# run, one --compile run, the fp16 resume; then the rest in the order make_items makes them.
FIRST = ["env:cuda", "data:synthetic", "data:shard-jpg", "data:shard-rgb64", "loader:dali-mixed",
         "loader:dali-gpu-rgb", "loader:cache-cuda-flip", "loader:cache-cuda-rgb", "loader:turbo-cuda",
         "loader:wds-cuda", "loader:pil-cuda", "train:vae-bf16", "train:vae-fp16", "train:vae-bf16-compile",
         "train:vae-fp16-resume", "gpu:bench-loader"]
# Seconds each item takes at --quick sizes on one H100-class GPU, first match wins. Estimates (no GPU
# has run them yet): a process start with torch ~5 s, accelerate launch two, a cold Inductor compile
# ~1-2 min; the CPU items are this 2-core machine's times.
ESTIMATES_S = [("env:cuda", 15), ("data:*", 10), ("loader:dali-*", 30), ("loader:*", 25),
               ("train:*-compile", 120), ("train:vae-fp16-resume", 70), ("train:ddp-*", 90), ("train:*", 45),
               ("gpu:bench-loader", 60), ("gpu:pytest", 150), ("cpu:*", 20)]


def build_items(chk: Check) -> list[Item]:
    items = make_items()
    for item in items:
        item.estimate_s = next(s for pat, s in ESTIMATES_S + [("*", 30)] if fnmatch.fnmatchcase(item.name, pat))
    rank = {name: i for i, name in enumerate(FIRST)}
    # stable: the rest keep their order, the CPU items (the harness's own check) last
    return sorted(items, key=lambda i: (rank.get(i.name, len(FIRST)), i.name.startswith("cpu:")))


def make_items() -> list[Item]:
    J, R = ("data:shard-jpg",), ("data:shard-rgb64",)
    items = [
        Item("env:cuda", "CUDA usable: a matmul on every GPU", [], env_cuda, needs=()),
        Item("data:synthetic", "tools/make_synthetic.py: a small synthetic CelebA", [], data_synthetic),
        Item("data:shard-jpg", "tools/shard.py without --size: JPEG-only shards (DALI must decode)", [],
             data_shards(True), after=("data:synthetic",)),
        Item("data:shard-rgb64", "tools/shard.py --size 64: JPEG + raw 64x64 shards", [],
             data_shards(False), after=("data:synthetic",)),
        # CPU sanity: the harness itself, on any machine
        Item("cpu:find-gpu-tests", "pytest --collect-only finds the GPU-only tests", [],
             gpu_tests(collect_only=True)),
        Item("cpu:loaders", "make_loader on the CPU, two epochs vs pil: DALI's CPU pipeline on JPEG (if "
             "installed), the cache with flips", [], cpu_loaders, after=J),
        Item("cpu:bench-loader", "bench/loader.py --device cpu: the cache on raw shards, one short pass", [],
             bench_loader("cpu"), after=J + R),
        Item("cpu:train-2-steps", "accelerate launch fastceleba/train.py on the CPU, 2 steps, AE", [],
             lambda c: train_cpu(c), after=J),
        # GPU
        Item("gpu:pytest", "pytest: the tests that skip without a GPU", ["gpu-tests"], gpu_tests(False),
             needs=("cuda",)),
        Item("gpu:bench-loader", "bench/loader.py --device cuda: every loader, DALI mixed and rgb, cache on GPU",
             ["bench-loader-gpu", "dali-mixed", "cache-device-epoch"], bench_loader("cuda"), needs=("cuda",),
             after=J + R),
        Item("loader:pil-cuda", "pil on cuda: DataLoader pin_memory + pinned non-blocking copy, vs CPU",
             ["pin-memory", "pinned-copy"], loader_probe("pil", "auto", "cuda", True), needs=("cuda",), after=J),
        Item("loader:wds-cuda", "wds on cuda: pin_memory + pinned non-blocking copy, vs CPU and pil",
             ["pin-memory", "pinned-copy"], loader_probe("wds", "jpg", "cuda", False), needs=("cuda",), after=J),
        Item("loader:turbo-cuda", "turbo on cuda: pinned non-blocking copy with flips, vs CPU and pil",
             ["pinned-copy"], loader_probe("turbo", "jpg", "cuda", True), needs=("cuda",), after=J),
        Item("loader:cache-cuda-flip", "cache on cuda: device epoch (index_select, flip, float) vs CPU and pil",
             ["cache-device-epoch"], loader_probe("cache", "jpg", "cuda", True), needs=("cuda",), after=J),
        Item("loader:cache-cuda-rgb", "cache on cuda from raw rgb shards, vs CPU and pil",
             ["cache-device-epoch"], loader_probe("cache", "rgb", "cuda", True), needs=("cuda",), after=R),
        Item("loader:dali-mixed", "dali on cuda, jpg member: nvJPEG 'mixed' graph + iterator, vs DALI CPU and pil",
             ["dali-mixed"], loader_probe("dali", "jpg", "cuda", False), needs=("cuda", "dali"), after=J),
        Item("loader:dali-gpu-rgb", "dali on cuda, raw rgb member: GPU crop/normalize, vs DALI CPU and pil",
             ["dali-gpu-raw"], loader_probe("dali", "rgb", "cuda", False), needs=("cuda", "dali"), after=R),
        Item("loader:dali-cuda1", "dali (mixed) on cuda:1: the DALI device id", ["dali-device-id"],
             loader_probe("dali", "jpg", "cuda:1", False), needs=("cuda", "multi_gpu", "dali"), after=J),
        Item("loader:cache-cuda1", "cache on cuda:1 with flips", ["cache-device-epoch"],
             loader_probe("cache", "jpg", "cuda:1", True), needs=("cuda", "multi_gpu"), after=J),
    ]
    for model in ("ae", "vae"):
        for compile in (False, True):
            for precision in ("fp32", "fp16", "bf16"):
                covers = [model, precision, "default-loader", "cuda-generators", "channels-last"]
                covers += ["cuda-autocast-eval"] if precision != "fp32" else []
                covers += ["compile"] if compile else []
                needs = ("cuda", "bf16") if precision == "bf16" else ("cuda",)
                name = f"train:{model}-{precision}" + ("-compile" if compile else "")
                what = (f"accelerate launch --mixed_precision {({'fp32': 'no'}).get(precision, precision)} "
                        f"train.py --model {model}" + (" --compile" if compile else "") + ", default loader")
                items.append(Item(name, what, covers, train_run(model, precision, compile), needs=needs, after=J))
    items += [
        Item("train:vae-fp16-resume", "fp16 epoch -> checkpoint with scaler.pt -> --resume under fp16",
             ["fp16-scaler-resume", "fp16", "vae"], fp16_resume, needs=("cuda",), after=J),
        Item("train:ddp-nccl", "accelerate launch --multi_gpu: VAE over NCCL, default loader (dali), --flip",
             ["nccl", "ddp-replicas", "ddp-eval-once", "dali-device-id", "default-loader"], ddp_run(None, "fp32"),
             needs=("cuda", "multi_gpu"), after=J),
        Item("train:ddp-nccl-cache-fp16", "accelerate launch --multi_gpu: VAE over NCCL, cache on each GPU, fp16",
             ["nccl", "ddp-replicas", "ddp-eval-once", "fp16", "cache-device-epoch"], ddp_run("cache", "fp16"),
             needs=("cuda", "multi_gpu"), after=J),
    ]
    return items


def train_cpu(chk: Check) -> dict:
    out = chk.runs / "cpu-ae"
    shutil.rmtree(out, ignore_errors=True)
    cmd = chk.launch("no") + ["--cpu", "fastceleba/train.py", "--model", "ae", "--data", chk.jpg, "--out", out,
                              "--max-steps", 2, "--batch-size", 16, "--workers", 1, "--loader", "cache"]
    _, text = chk.sh(cmd)
    summary = json.loads((out / "summary.json").read_text())
    sizes = chk.split_sizes()
    if summary["steps"] != 2 or summary["test"]["num_samples"] != sizes["test"]:
        raise Failure(f"steps {summary['steps']}, test images {summary['test']['num_samples']} of {sizes['test']}")
    return {"device": summary["device"], "steps": 2, "test_psnr": round(summary["test"]["psnr"], 2)}


# ---------------------------------------------------------------------------------------------------- subprocess modes
def probe(spec: dict) -> dict:
    """make_loader of one kind on spec['device'] for two epochs; every tensor on that device, each valid
    image of the split exactly once per epoch; images compared by CelebA number with the same kind on
    the CPU (exact for every kind but DALI, whose nvJPEG and CPU decoders may differ within 2/255) and
    with the pil baseline (within 2/255, the loaders' contract)."""
    import torch

    from fastceleba.loaders import make_loader

    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    def one(kind: str, member: str, dev: torch.device, flip: bool) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        ld = make_loader(kind, spec["data"], spec["split"], spec["batch_size"], device=dev, shuffle=True, seed=0,
                         flip=flip, num_workers=spec["workers"], member=member, progress=False)
        setup = time.perf_counter() - t0
        images: dict[int, torch.Tensor] = {}
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            nums = []
            for b in ld:
                for k, v in b.items():
                    if v.device != (dev if dev.index is not None or dev.type == "cpu" else torch.device(dev.type, 0)):
                        raise AssertionError(f"{kind}: batch[{k!r}] is on {v.device}, not {dev}")
                x, valid = b["image"], b["valid"].bool()
                if x.dtype != torch.float32 or tuple(x.shape[1:]) != (3, 64, 64):
                    raise AssertionError(f"{kind}: image {x.dtype} {tuple(x.shape)}")
                if not (x.min() >= 0 and x.max() <= 1):
                    raise AssertionError(f"{kind}: image values outside [0, 1]")
                n = b["num"][valid].cpu().tolist()
                nums += n
                if epoch == 1:
                    for i, img in zip(n, x[valid].cpu()):
                        images[int(i)] = img
            if len(nums) != len(set(nums)) or len(nums) != ld.num_samples:
                raise AssertionError(f"{kind} epoch {epoch}: {len(nums)} valid images ({len(set(nums))} distinct), "
                                     f"the split has {ld.num_samples}")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return images, {"setup_s": round(setup, 3), "batches": len(ld)}

    def mad(a: dict, b: dict, mirrored: bool = False) -> float:
        """The largest per-image mean absolute difference; with mirrored, against b or its mirror image
        (kinds flip different images: each draws its flips over its own sample order)."""
        if a.keys() != b.keys():
            raise AssertionError(f"different images: {sorted(a.keys() ^ b.keys())[:10]}")
        worst = 0.0
        for k in a:
            d = float((a[k] - b[k]).abs().mean())
            if mirrored:
                d = min(d, float((a[k] - b[k].flip(-1)).abs().mean()))
            worst = max(worst, d)
        return worst

    kind, member, flip = spec["kind"], spec["member"], spec["flip"]
    mine, info = one(kind, member, device, flip)
    result: dict[str, Any] = {"kind": kind, "member": member, "device": str(device), "flip": flip, **info,
                              "images": len(mine)}
    if kind != "pil":
        pil, _ = one("pil", "auto", torch.device("cpu"), False)
        result["max_mad_vs_pil_x255"] = round(mad(mine, pil, mirrored=flip) * 255, 3)
        if result["max_mad_vs_pil_x255"] > TOL * 255:
            raise AssertionError(f"{kind} on {device} differs from pil by up to {result['max_mad_vs_pil_x255']}/255 "
                                 f"mean absolute per image (contract: <= 2/255)")
    if spec.get("against_self") and device.type != "cpu":
        cpu, _ = one(kind, member, torch.device("cpu"), flip)
        d = mad(mine, cpu)
        result["max_mad_vs_cpu_x255"] = round(d * 255, 3)
        tol = TOL if (kind == "dali" and member == "jpg") else 1e-6
        if d > tol:
            raise AssertionError(f"{kind} on {device} differs from {kind} on the CPU by up to {d * 255:.3f}/255 "
                                 f"(allowed {tol * 255:.3g}/255)")
    return result


def rank_hash(argv: list[str]) -> int:
    """Launched on every rank: train.py's job, then this rank's weight hash, backend and device in OUT/rank-R.json."""
    from accelerate import PartialState

    from fastceleba.train import parse_args, train

    args = parse_args(argv)
    model, _ = train(args)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    state = PartialState()
    record = {"rank": state.process_index, "sha256": digest.hexdigest(), "backend": state.backend,
              "distributed_type": str(state.distributed_type), "device": str(next(model.parameters()).device)}
    Path(args.out, f"rank-{state.process_index}.json").write_text(json.dumps(record) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-hash"]:  # internal: launched by accelerate on every rank
        return rank_hash(argv[1:])
    if argv[:1] == ["--facts"]:  # internal: torch's CUDA facts, one result line
        print(result_line(torch_facts()), flush=True)
        return 0
    args = parse_args(argv, __doc__)
    if args.probe:
        spec = json.loads(args.probe)
        print(result_line([probe(s) for s in spec] if isinstance(spec, list) else probe(spec)), flush=True)
        return 0

    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    env = environment(SCRIPT)
    chk = Check(args, env, SCRIPT)
    items = build_items(chk)
    if args.list:
        for i in items:
            print(f"{i.name:<28}{'needs ' + '+'.join(i.needs) if i.needs else 'any machine':<26}"
                  f"~{i.estimate_s:>4.0f} s  {i.what}")
        return 0
    selected = select(items, args.only)
    if not selected:
        print(f"error: --only {args.only!r} matches no item; see --list", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for sub in ("runs", "logs"):
            shutil.rmtree(args.out / sub, ignore_errors=True)
    except OSError as e:
        print(f"error: {args.out}: cannot write ({e.strerror}); pass another --out", file=sys.stderr)
        return 2

    def report() -> dict:
        return build_report(argv, args, env, items, PATHS, started, time.monotonic() - t0)

    run_items(items, chk, selected, args.budget, t0, lambda: save_report(args.json, report()))
    final = report()
    save_report(args.json, final)
    return print_summary(final, items, args.json)


if __name__ == "__main__":
    sys.exit(main())
