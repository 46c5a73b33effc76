"""The training side of issue 11's GPU-path defects, shown where a CPU can show them.

Real processes of fastceleba/train.py on real shards. Two CPU processes over gloo stand in for two GPUs;
started by hand with LOCAL_RANK=0 each, they stand in for two *nodes* (what `accelerate launch` on two
machines sets up), which is where accelerator.print printed twice. What needs CUDA itself (a real
GradScaler overflowing in fp16, cuDNN's kernels, NCCL) is bench/gpu_check.py's; where a CPU can drive the
same code, a constructed case does (a real torch.amp.GradScaler on the CPU attached to the Accelerator,
as Accelerate attaches one on CUDA under fp16).
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastceleba.shardwriter import ShardOptions, write_shards
from fastceleba.synth import generate

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fastceleba" / "train.py"
FAST = ["--batch-size", "8", "--workers", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """250 images -> 200 train / 25 valid / 25 test (as tests/test_train.py)."""
    root = tmp_path_factory.mktemp("celeba250")
    generate(root, 250, seed=0, progress=False)
    out = tmp_path_factory.mktemp("shards250")
    write_shards(root, out, ShardOptions(size=64, shard_size=50), progress=False)
    return out


def run(*args, cmd: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full = [*(cmd or [sys.executable, str(TRAIN)]), *map(str, args)]
    return subprocess.run(full, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args) -> list[subprocess.CompletedProcess]:
    """train.py as ranks 0 and 1 of one gloo group, each the local rank 0 of its own 'node'."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), *map(str, args)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.fixture
def accelerate_state():
    """For tests that build an Accelerator in this process: reset Accelerate's singletons afterwards."""
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(True)


# ------------------------------------------------------------------------ 1. a broken CUDA install
def test_gpu_hardware_is_found_by_file_or_nvidia_smi(tmp_path):
    from fastceleba.runtime import nvidia_gpus

    sign = tmp_path / "version"
    assert nvidia_gpus(paths=(str(sign),), smi=str(tmp_path / "no-such-smi")) is None
    sign.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    assert nvidia_gpus(paths=(str(sign),), smi="x") == str(sign)
    smi = tmp_path / "nvidia-smi"  # a real program that lists two GPUs, as nvidia-smi -L does
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] && printf 'GPU 0: NVIDIA H200 (UUID: GPU-1)\\n"
                   "GPU 1: NVIDIA H200 (UUID: GPU-2)\\n'\n")
    smi.chmod(0o755)
    found = nvidia_gpus(paths=(), smi=str(smi))
    assert found is not None and "GPU 0: NVIDIA H200" in found and "(+1)" in found


def test_cuda_problem_only_when_gpus_exist_cuda_does_not_and_cpu_was_not_asked():
    from fastceleba.runtime import cuda_problem

    assert cuda_problem(cpu_asked=False, cuda_available=False, gpus=None) is None  # CI: no GPU at all
    assert cuda_problem(cpu_asked=True, cuda_available=False, gpus="/dev/nvidia0") is None
    assert cuda_problem(cpu_asked=False, cuda_available=True, gpus="/dev/nvidia0") is None
    msg = cuda_problem(cpu_asked=False, cuda_available=False, gpus="/dev/nvidia0")
    assert msg and "/dev/nvidia0" in msg and "--cpu" in msg and "\n" not in msg
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert f"CUDA {torch.version.cuda}" in msg and "R580" in msg


def test_gpus_that_torch_cannot_use_stop_the_run_unless_cpu_is_asked(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA works here: the broken-install path cannot be shown")
    sign = tmp_path / "nvidia-version"
    sign.write_text("NVRM version: 535.0\n")
    # train.py's own main(), with the driver file it looks for at a path of ours: a machine with an NVIDIA
    # driver whose GPUs this torch cannot use.
    prog = ("import sys; import fastceleba.runtime as r, fastceleba.train as t; r.NVIDIA_SIGNS = (sys.argv[1],); "
            "sys.exit(t.main(sys.argv[2:]))")
    cmd = [sys.executable, "-c", prog, str(sign)]
    common = ["--data", data, "--max-steps", "1", "--no-pictures", "--no-test", "--eval-every", "0", *FAST]
    proc = run(*common, "--out", tmp_path / "refused", cmd=cmd)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr
    assert "NVIDIA GPUs are present" in proc.stderr and "pass --cpu" in proc.stderr
    assert "training" not in proc.stdout and not (tmp_path / "refused" / "metrics.jsonl").exists()
    for flag, env in ((["--cpu"], {}), ([], {"ACCELERATE_USE_CPU": "true"})):
        proc = ok(run(*common, *flag, "--out", tmp_path / f"cpu{len(flag)}", cmd=cmd, env=env))
        assert "on 1 x cpu (asked for)" in proc.stdout
    # No GPU hardware at all (this machine): the CPU, saying why.
    if not any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidia0")):
        proc = ok(run(*common, "--out", tmp_path / "plain"))
        assert "on 1 x cpu (no NVIDIA GPU on this machine)" in proc.stdout


# ------------------------------------ 2 + 5. global batch; one line per event; errors once, same status
def test_two_nodes_global_batch_one_line_per_event(data, tmp_path):
    out = tmp_path / "run"
    ranks = two_nodes("--data", data, "--out", out, "--epochs", "1", "--global-batch-size", "16",
                      "--loader", "turbo", "--workers", "1", "--no-pictures")
    for p in ranks:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = ranks[0].stdout + ranks[1].stdout
    # 16 over 2 processes: 8 per process, 200 // 16 = 12 steps, stated at start, once.
    start = [line for line in text.splitlines() if line.startswith("training ")]
    assert len(start) == 1 and "global batch 16 (2 x 8), 12 steps per epoch, 12 steps in all" in start[0]
    assert ranks[1].stdout.strip() == ""  # rank 1 (local main of its node) prints nothing
    for event in ("epoch 1/1 step 12:", "test: ", "wrote "):
        assert sum(line.startswith(event) for line in text.splitlines()) == 1, event
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 12 and summary["global_batch_size"] == 16
    assert summary["backend"] == "gloo" and summary["args"]["batch_size"] == 8
    assert summary["scaler_skipped_steps"] == 0


def test_two_nodes_agree_on_errors_and_print_them_once(data, tmp_path):
    # A global batch that does not divide among the processes: status 2 on both, one line.
    ranks = two_nodes("--data", data, "--out", tmp_path / "odd", "--global-batch-size", "15",
                      "--loader", "turbo", "--workers", "1")
    assert [p.returncode for p in ranks] == [2, 2]
    errors = error_lines(ranks[0].stderr + ranks[1].stderr)
    assert errors == ["error: --global-batch-size 15 is not a multiple of the 2 processes; use e.g. 14"]
    # Divergence, found on every rank alike: status 3 on both, one line.
    ranks = two_nodes("--data", data, "--out", tmp_path / "nan", "--epochs", "1", "--lr", "1e10",
                      "--warmup-steps", "0", "--loader", "turbo", *FAST)
    assert [p.returncode for p in ranks] == [3, 3], ranks[0].stderr[-2000:]
    errors = error_lines(ranks[0].stderr + ranks[1].stderr)
    assert len(errors) == 1 and "training diverged" in errors[0]


def test_global_batch_size_is_exclusive_with_batch_size(data, tmp_path):
    proc = run("--data", data, "--out", tmp_path, "--batch-size", "8", "--global-batch-size", "16")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    proc = run("--help")
    assert "--global-batch-size" in proc.stdout and "--deterministic" in proc.stdout and "--cpu" in proc.stdout


# ------------------------------------------------- 3. deterministic mode; 7. the first step reported apart
def test_deterministic_resume_is_bitwise_and_first_step_is_reported_apart(data, tmp_path):
    common = ["--data", data, "--epochs", "2", "--flip", "--no-pictures", "--no-test", "--deterministic",
              "--loader", "cache", *FAST]
    proc = ok(run(*common, "--out", tmp_path / "whole"))
    assert "deterministic kernels" in proc.stdout
    ok(run(*common, "--out", tmp_path / "cut", "--max-steps", "30"))
    ok(run(*common, "--out", tmp_path / "cut", "--resume"))
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 < r["first_step_seconds"] < r["seconds"] and r["images_per_s"] > 0
        assert r["scaler_skipped_steps"] == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["deterministic"] is True and summary["backend"] is None
    state = json.loads((tmp_path / "whole" / "checkpoints" / "epoch_2" / "trainer_state.json").read_text())
    assert state["mixed_precision"] == "no"


# ---------------------------------------------------- 4. the steps fp16's GradScaler skips are counted
def test_skipped_scaler_steps_are_counted(data, accelerate_state):
    from accelerate import Accelerator

    from fastceleba import train
    from fastceleba.loaders import make_loader
    from fastceleba.models import build_model
    from fastceleba.recipe import recipe_from_args

    args = train.parse_args(["--data", str(data), "--epochs", "1", "--log-every", "5", *FAST])
    recipe = recipe_from_args(args)
    accelerator = Accelerator(cpu=True)
    # What Accelerate does under fp16 on CUDA, on the CPU: a real GradScaler whose first scale (2^127)
    # overflows the scaled gradients to inf, so it skips steps, halving the scale each time, as fp16 does
    # with the VAE's summed loss.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=10 ** 6)
    torch.manual_seed(0)
    model = build_model("vae", 80)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = train.make_loss_fn(model, "vae", "sum")
    loader = make_loader("cache", data, "train", 8, shuffle=True, drop_last=True, num_workers=1)
    stats = train.train_one_epoch(args, accelerator, model, loss_fn, optimizer, loader, 0, 0, recipe, 25, None)
    halvings = round(math.log2(2.0 ** 127 / accelerator.scaler.get_scale()))
    assert stats.steps == 25 and 0 < stats.skipped < 25
    assert stats.skipped == halvings  # every skip halved the scale once; no step was skipped unnoticed


# --------------------------------- 8. no per-step tensor made from a Python number (a blocking copy on a GPU)
def test_a_step_makes_no_tensor_from_python_numbers(data, accelerate_state):
    """torch.tensor(x, device=cuda) is a pageable host-to-device copy that waits for the GPU, so the CPU
    cannot queue the next step while this one runs. Count such tensors (aten.lift_fresh, what torch.tensor
    dispatches; 0-d, as a scalar's is: the CPU loader's numpy batches are not) over epochs of 6 and 12 steps:
    per-epoch ones (Adam's step counters, the epoch's totals) are allowed, per-step ones are not."""
    from accelerate import Accelerator
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastceleba.loaders import make_loader
    from fastceleba.models import build_model
    from fastceleba.recipe import recipe_from_args
    from fastceleba.train_args import parse_args
    from fastceleba.train_loop import make_loss_fn, train_one_epoch

    class Count(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Count.made += func.__name__.startswith("lift_fresh") and out.dim() == 0
            return out

    accelerator = Accelerator(cpu=True)
    made = []
    for steps in (6, 12):
        args = parse_args(["--data", str(data), "--log-every", "1000", "--max-steps", str(steps), *FAST])
        recipe = recipe_from_args(args)
        model = build_model("vae", 80)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = make_loader("cache", data, "train", 8, shuffle=True, drop_last=True, num_workers=1)
        Count.made = 0
        with Count():
            stats = train_one_epoch(args, accelerator, model, make_loss_fn(model, "vae", "image"), optimizer,
                                    loader, 0, 0, recipe, 25, None)
        assert stats.steps == steps
        made.append(Count.made)
    assert made[0] == made[1], f"tensors made from Python numbers: {made[0]} in 6 steps, {made[1]} in 12"


# ---------------------------------------------------------------- 6. resume across precisions
def test_fp16_resume_of_an_fp32_checkpoint_starts_a_fresh_scaler(data, tmp_path, accelerate_state):
    from accelerate import Accelerator

    from fastceleba import checkpoints
    from fastceleba.checkpoints import register_weight_hooks
    from fastceleba.models import build_model

    out = tmp_path / "fp32"
    ok(run("--data", data, "--out", out, "--epochs", "1", "--no-pictures", "--no-test", "--loader", "cache", *FAST))
    ckpt = out / "checkpoints" / "epoch_1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["mixed_precision"] == "no" and not (ckpt / "scaler.pt").exists()

    def fp16_like() -> Accelerator:  # an Accelerator with fp16's GradScaler, as on CUDA
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
        acc = Accelerator(cpu=True)
        acc.scaler = torch.amp.GradScaler("cpu")
        model = build_model("vae", 80)
        acc.prepare(model, torch.optim.Adam(model.parameters()))
        register_weight_hooks(acc)
        return acc

    with pytest.raises(FileNotFoundError, match="scaler.pt"):  # the defect: Accelerate alone
        fp16_like().load_state(str(ckpt))
    acc, lines = fp16_like(), []
    checkpoints.load_resume_state(acc, ckpt, state, lines.append)
    assert acc.scaler is not None and acc.scaler.get_scale() == 65536.0
    assert len(lines) == 1 and "mixed precision no" in lines[0] and "starts afresh" in lines[0]
    weights = load_file(ckpt / "model.safetensors")
    loaded = acc.unwrap_model(acc._models[0]).state_dict()
    assert all(torch.equal(weights[k], loaded[k]) for k in weights)


# ------------------------------------------------ 7. the cache's mean-image pass reads what it holds
def test_cache_view_gives_the_mean_image_of_a_second_pass(data, accelerate_state):
    from accelerate import Accelerator

    from fastceleba.loaders import make_loader
    from fastceleba.metrics import mean_image

    acc = Accelerator(cpu=True)
    cache = make_loader("cache", data, "train", 8, shuffle=True, flip=True, drop_last=True, num_workers=1)
    streamed = make_loader("turbo", data, "train", 8, num_workers=1)
    assert torch.equal(mean_image(cache.view(), acc), mean_image(streamed, acc))


# ------------------------------------------------------------------- 9. --data at a URL
@pytest.fixture
def http_data(data):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(data)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_data_at_a_url_trains_with_wds_and_other_loaders_refuse(http_data, tmp_path):
    proc = ok(run("--data", http_data, "--out", tmp_path / "url", "--max-steps", "2", "--no-pictures", *FAST))
    assert "loader wds" in proc.stdout
    summary = json.loads((tmp_path / "url" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["args"]["loader"] == "wds"
    assert summary["valid"]["num_samples"] == 25 and summary["test"]["num_samples"] == 25
    proc = run("--data", http_data, "--out", tmp_path / "cache", "--loader", "cache", *FAST)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr
    assert "tools/stage.py" in proc.stderr


# ------------------------------------------------------------- 5. the saved state is written once
SAVE_ONCE = """
import contextlib, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from accelerate import Accelerator
from fastceleba.checkpoints import register_weight_hooks, save_checkpoint, scaler_saved_once
from fastceleba.models import build_model
out, once = Path(sys.argv[1]), sys.argv[2] == "once"
acc = Accelerator(cpu=True)
acc.scaler = torch.amp.GradScaler("cpu")  # fp16's scaler, as Accelerate makes it on CUDA
model = build_model("ae", 80)
acc.prepare(model, torch.optim.Adam(model.parameters()))
register_weight_hooks(acc)
real_save = torch.save
def spy(obj, f, *args, **kw):  # note which rank writes scaler.pt
    if str(f).endswith("scaler.pt"):
        (out / f"scaler-written-by-rank{acc.process_index}").touch()
    return real_save(obj, f, *args, **kw)
torch.save = spy
with scaler_saved_once(acc) if once else contextlib.nullcontext():
    save_checkpoint(acc, out / "checkpoints", {"epoch": 1, "step": 1, "model": "ae", "latent_dim": None})
"""


def test_fp16_scaler_state_is_written_by_one_process(tmp_path):
    prog = tmp_path / "save_once.py"
    prog.write_text(SAVE_ONCE)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    for mode, writers in (("plain", ["scaler-written-by-rank0", "scaler-written-by-rank1"]),
                          ("once", ["scaler-written-by-rank0"])):
        out = tmp_path / mode
        out.mkdir()
        ok(run(out, mode, ROOT, cmd=[*launcher, str(prog)]))
        assert sorted(p.name for p in out.glob("scaler-written-by-*")) == writers  # plain: Accelerate's own
        assert (out / "checkpoints" / "epoch_1" / "scaler.pt").is_file()
