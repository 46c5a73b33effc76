"""fastceleba/fid.py: the Fréchet distance and KID against closed forms, the whole sample-quality path with
a stand-in feature net (NOT Inception), and the run's one note: line and nulls when there are no weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from scipy.linalg import sqrtm
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from fastceleba import fid
from fastceleba.models import VAE

ROOT = Path(__file__).resolve().parents[1]


def with_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and (n - 1)-normalised covariance are exactly mean and cov."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # orthonormal, zero-mean columns: sample covariance I / (n - 1)
    return mean + (n - 1) ** 0.5 * q @ torch.linalg.cholesky(cov).T


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=fid._Given(a.shape[1]))
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    d = 6
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a1, a2 = (torch.randn(d, d, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = a1 @ a1.T + 0.1 * torch.eye(d), a2 @ a2.T + 0.1 * torch.eye(d)  # do not commute
    x, y = with_moments(400, mu1, s1, 1), with_moments(300, mu2, s2, 2)
    root = sqrtm(s1.numpy() @ s2.numpy()).real
    want = float((mu1 - mu2).pow(2).sum() + torch.trace(s1 + s2) - 2 * float(root.trace()))
    assert frechet(x, y) == pytest.approx(want, rel=1e-6)
    # diagonal covariances: d² = |mu1 - mu2|² + sum (sigma1 - sigma2)²
    v1, v2 = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    m1, m2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    x, y = with_moments(200, m1, torch.diag(v1), 3), with_moments(200, m2, torch.diag(v2), 4)
    assert frechet(x, y) == pytest.approx(5.0 + (1 + 0 + 4), rel=1e-6)
    assert frechet(x, x) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_the_unbiased_mmd_estimator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    m = x.shape[0]

    def kid(degree: int) -> float:  # one subset of all m images: no sampling in the estimate
        metric = KernelInceptionDistance(feature=fid._Given(3), subsets=1, subset_size=m, degree=degree)
        metric.update(x, real=True)
        metric.update(y, real=False)
        return float(metric.compute()[0])

    def k(a, b, degree):
        return (a @ b / 3 + 1) ** degree

    # by hand: mean over i != j of k(x_i, x_j) and of k(y_i, y_j), minus twice the mean over all i, j of k(x_i, y_j)
    xx = sum(k(x[i], x[j], 3) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j], 3) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j], 3) for i in range(m) for j in range(m)) / m ** 2
    assert kid(3) == pytest.approx(float(xx + yy - 2 * xy), rel=1e-9)
    # linear kernel: (|sum x|² - sum |x|²) / (m (m - 1)) + the same for y - 2 sum x . sum y / m², over d
    sx, sy = x.sum(0), y.sum(0)
    lin = ((sx @ sx - (x * x).sum()) / (m * (m - 1)) + (sy @ sy - (y * y).sum()) / (m * (m - 1))
           - 2 * (sx @ sy) / m ** 2) / 3
    assert kid(1) == pytest.approx(float(lin), rel=1e-9)


class OneProcess:
    """What sample_quality needs of an Accelerator, on one CPU process."""
    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def autocast(self):
        return nullcontext()


class Identity(torch.nn.Module):
    """A "model" that reconstructs perfectly (the AE path: no prior samples)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def batches(n: int, pad: int = 3, size: int = 8) -> list[dict]:
    x = torch.rand(n + pad, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    valid = torch.arange(n + pad) < n  # the padding a sharded loader adds must not count
    return [{"image": x[i:i + size], "valid": valid[i:i + size]} for i in range(0, n + pad, size)]


def test_sample_quality_end_to_end_with_a_stand_in_that_is_not_inception():
    features = fid.RandomConvFeatures()
    assert (features.fd_name, features.kd_name) == ("rfd", "rkid") and "NOT Inception" in features.description
    vae = VAE(8)
    q = fid.sample_quality(vae, batches(30), OneProcess(), features, seed=0, kid_subset_size=1000)
    assert q["computed"] and q["num_images"] == 30 and q["temperature"] == 1.0
    assert not any(key.startswith(("fid", "kid")) for key in q)  # never under the standard names
    assert q["rfd"] > 0 and q["rfd_recon"] > 0 and q["prior_hole"] == pytest.approx(q["rfd"] - q["rfd_recon"])
    assert q["rkid_subset_size"] == 30 and q["rkid_std"] >= 0
    again = fid.sample_quality(vae, batches(30), OneProcess(), features, seed=0)
    assert again == q  # seeded: the prior draws and KID's subsets
    cold = fid.sample_quality(vae, batches(30), OneProcess(), features, seed=0, temperature=0.0)
    assert cold["rfd"] != q["rfd"] and cold["rfd_recon"] == q["rfd_recon"]
    perfect = fid.sample_quality(Identity(), batches(30), OneProcess(), features)
    assert "rfd" not in perfect and perfect["rfd_recon"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["hf_ratio_recon"] == pytest.approx(1.0) and "hf_ratio" not in perfect  # the AE-like path
    assert q["hf_share_test"] == pytest.approx(perfect["hf_share_test"]) and q["hf_ratio"] > 0
    assert "random-feature FD (not FID)" in fid.format_quality(q)


def test_high_frequency_share_sees_a_checkerboard_and_not_a_smooth_image():
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    high, total = fid.high_frequency_energy(noise)
    band = 17 / 64  # frequencies k/64 with |k| >= 24 of -32..31, on each axis
    assert (high / total).item() == pytest.approx(1 - (1 - band) ** 2, abs=0.02)  # white noise: the band's area
    checker = torch.zeros(2, 3, 64, 64)
    checker[..., ::2, ::2] = 1.0  # a stride-2 layer's artefact: all of it at Nyquist
    high, total = fid.high_frequency_energy(checker)
    assert (high / total).item() == pytest.approx(1.0)
    ramp = torch.linspace(0, 1, 64).expand(2, 3, 64, 64)
    high, total = fid.high_frequency_energy(ramp)
    assert (high / total).item() < 0.02


def test_inception_weights_are_checked_and_loaded_without_pickles(tmp_path, monkeypatch):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="is not the standard weights"):
        fid.load_inception(other)
    from safetensors.torch import save_file
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 weights"):
        fid.load_inception(wrong)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv(fid.ENV_WEIGHTS, raising=False)
    path, why = fid.find_weights(None)
    assert path is None and "downloads are off (FASTCELEBA_OFFLINE is set)" in why
    assert fid.find_weights(str(tmp_path / "missing.pth"))[1].endswith("missing.pth: no such file")


def test_a_run_without_weights_notes_it_once_and_records_null(shards, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub"), "FASTCELEBA_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(fid.ENV_WEIGHTS, None)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "fastceleba" / "train.py"), "--data", str(shards), "--out", str(out),
           "--max-steps", "1", "--batch-size", "8", "--workers", "1", "--loader", "cache", "--no-pictures"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert len([line for line in text.splitlines() if line.startswith("note: FID/KID not computed")]) == 1
    q = json.loads((out / "summary.json").read_text())["sample_quality"]
    assert q["computed"] is False and q["fid"] is None and q["kid"] is None and "FASTCELEBA_OFFLINE" in q["reason"]
    assert "FID not computed" in proc.stdout.strip().splitlines()[-1]
    bad = subprocess.run([*cmd, "--inception-weights", str(tmp_path / "nope.pth")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nope.pth: no such file" in bad.stderr
