"""Settings a GPU run depends on, checked where a CPU can check them (issue 17, section 2).

The kernel flags of ``runtime.set_backends`` are plain torch settings: they can be set and read
without a GPU, so a run under --deterministic can be shown to leave no TF32 on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastceleba.loaders import DEFAULT_WORKERS, KINDS, make_loader
from fastceleba.runtime import set_backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def backends(monkeypatch):
    """Restore every global set_backends touches, so other tests see torch's defaults."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield torch.backends
    det, warn_only, cudnn_det, bench, cudnn_tf32, matmul_tf32 = saved
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, bench
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32


@pytest.mark.parametrize("cuda", [True, False])
def test_deterministic_turns_every_tf32_off(backends, cuda):
    # as after an earlier fast run in this process, and as torch starts (cuDNN's TF32 is on by default)
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = True
    set_backends(deterministic=True, cuda=cuda)
    assert torch.are_deterministic_algorithms_enabled()
    assert backends.cudnn.deterministic and not backends.cudnn.benchmark
    assert not backends.cudnn.allow_tf32, "cuDNN convolutions still in TF32 under --deterministic"
    assert not backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_fast_cuda_turns_the_autotuner_and_tf32_on(backends):
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = backends.cudnn.benchmark = False
    assert set_backends(deterministic=False, cuda=True) == "cudnn.benchmark, TF32"
    assert backends.cudnn.benchmark and backends.cudnn.allow_tf32 and backends.cuda.matmul.allow_tf32


def test_dali_on_a_gpu_takes_the_threads_it_is_given(monkeypatch):
    """--workers N gave DALI on a GPU max(N, every core of the process) threads, so bench/loader.py timed
    it with all cores against the others' N. A count given is taken; none given keeps the cores."""
    pytest.importorskip("nvidia.dali")
    from fastceleba.loaders.base import cores_per_local_rank
    from fastceleba.loaders.dali import pipeline_threads

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = cores_per_local_rank()
    if cores < 2:
        pytest.skip("one core: one thread and all the cores are the same")
    assert pipeline_threads(1, gpu=True) == 1
    assert pipeline_threads(0, gpu=True) == 1
    assert pipeline_threads(None, gpu=True) == cores  # unasked: nvJPEG's host stages get the cores
    assert pipeline_threads(None, gpu=False) == DEFAULT_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert pipeline_threads(None, gpu=True) == 1  # the cores are shared by the node's processes


@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_says_how_many_workers_it_uses(shards, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    threads = kind in ("turbo", "cache", "dali")  # a pool of threads; pil and wds fork processes
    for asked, used in ((0, 1 if threads else 0), (3, 3), (None, DEFAULT_WORKERS)):
        ld = make_loader(kind, shards, "valid", 8, num_workers=asked, progress=False)
        assert (ld.workers, ld.workers_are) == (used, "threads" if threads else "processes"), asked
        ld.close()


def test_bench_loader_records_each_loaders_workers(shards, tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loader.py"), "--data", shards, "--split", "valid",
                           "--loaders", "turbo:jpg,wds:rgb", "--workers", "0", "--images", "16", "--repeats", "1",
                           "--warmup", "0", "--json", out, "--csv", tmp_path / "l.csv", "--png", tmp_path / "l.png"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    got = {r["loader"]: (r["workers"], r["workers_are"], r["workers_asked"]) for r in results}
    assert got == {"turbo:jpg": (1, "threads", 0), "wds:rgb": (0, "processes", 0)}
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("turbo:", "wds:"))}
    assert " 1 thr " in rows["turbo:jpg"] and " 0 proc " in rows["wds:rgb"]


def test_bench_train_sets_train_pys_kernels(tmp_path):
    """bench/train.py timed the step without the backends train.py sets (cuDNN's autotuner, TF32 on
    CUDA): its figures were not train.py's. Both sections now set them and say which."""
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--device", "cpu", "--models", "ae",
                           "--modes", "eager", "--precisions", "fp32", "--feeds", "memory", "--batch-size", "8",
                           "--steps", "2", "--repeats", "1", "--warmup", "1", "--json", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    want = set_backends(deterministic=False, cuda=False)  # what train.py sets on this device
    assert report["kernels"] == want and report["fed"][0]["kernels"] == want, report["fed"]
    assert f"kernels: {want}" in proc.stdout
