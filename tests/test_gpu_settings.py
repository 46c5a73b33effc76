"""Settings a GPU run depends on, checked where a CPU can check them (issue 17, section 2).

The kernel flags of ``runtime.set_backends`` are plain torch settings: they can be set and read
without a GPU, so a run under --deterministic can be shown to leave no TF32 on.
"""

from __future__ import annotations

import pytest
import torch

from fastceleba.runtime import set_backends


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
