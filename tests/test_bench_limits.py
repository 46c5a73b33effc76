"""bench/layers.py and bench/turbo_stages.py, the two benchmarks that hold the step and the turbo loader
against what the machine can do: their arithmetic and a short end-to-end run (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastceleba.shardwriter import ShardOptions, write_shards
from fastceleba.synth import generate

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))  # last: bench's modules must not shadow anything

import layers  # noqa: E402


def bench(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_layer_flops_are_the_multiply_adds_of_the_notebooks_7x7_layers():
    # 128 images: Conv2d(32, 64, 7) makes 64 x 10 x 10 outputs, each a sum of 32 x 49 products;
    # ConvTranspose2d(64, 32, 7) spreads each of 64 x 10 x 10 inputs over 32 x 49 outputs: the same count
    assert layers.forward_flop(nn.Conv2d(32, 64, 7), torch.zeros(128, 32, 16, 16)) == 2 * 128 * 6400 * 32 * 49
    assert layers.forward_flop(nn.ConvTranspose2d(64, 32, 7), torch.zeros(128, 64, 10, 10)) == 2 * 128 * 6400 * 32 * 49
    assert layers.forward_flop(nn.Linear(6400, 80), torch.zeros(128, 6400)) == 2 * 128 * 6400 * 80


def test_layers_reports_every_layer_of_the_vae_in_forward_order(tmp_path):
    out = tmp_path / "layers.json"
    bench("layers.py", "--models", "vae", "--batch-size", "4", "--repeats", "1", "--json", out)
    report = json.loads(out.read_text())
    assert [r["layer"] for r in report["layers"]] == ["enc_conv1", "enc_conv2", "enc_conv3", "fc_mu", "fc_logvar",
                                                      "dec_fc", "dec_conv1", "dec_conv2", "dec_conv3"]
    assert report["layers"][6]["input"] == [4, 64, 10, 10] and report["layout"] == "channels_last"
    # the first layer's input is the data: its backward is the weight gradient alone
    first, second = report["layers"][:2]
    assert first["gflop"] == pytest.approx(2 * 4 * 16 * 32 * 32 * 3 * 9 * 2 / 1e9)
    assert second["gflop"] == pytest.approx(2 * 4 * 32 * 16 * 16 * 16 * 9 * 3 / 1e9)
    assert report["steps"]["vae"]["step_ms"] > 0


def test_turbo_stages_times_each_stage_of_the_reader(tmp_path):
    generate(tmp_path / "celeba", 60, seed=0, progress=False)
    write_shards(tmp_path / "celeba", tmp_path / "shards", ShardOptions(shard_size=30), progress=False)
    proc = bench("turbo_stages.py", "--data", tmp_path / "shards", "--chunk", "8", "--repeats", "4")
    rows = {line.split("  ")[0].strip() for line in proc.stdout.splitlines() if "us/image" in line}
    assert {"read", "header", "decode (reduced scale)", "resize (uint8, batched)", "crop copy", "float conversion",
            "SampleReader.images()", "with float conversion"} <= rows, proc.stdout
    assert "decoded at 109x89" in proc.stdout  # 218x178 faces at 1/2 DCT scale, as turbo decodes them
