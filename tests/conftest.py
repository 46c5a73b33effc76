"""Shared test data: one small synthetic CelebA and its shards, made once per test session."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never download (the Inception weights of fastceleba/fid.py); runs they start inherit this.
os.environ.setdefault("FASTCELEBA_OFFLINE", "1")
sys.path.insert(0, str(ROOT))  # tools/ and bench/ scripts import fastceleba from the checkout

from fastceleba.shardwriter import ShardOptions, write_shards  # noqa: E402
from fastceleba.synth import generate  # noqa: E402

NUM_IMAGES = 240  # official-style contiguous partition: 192 train, 24 valid, 24 test


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    """A synthetic CelebA in the official layout. Tests must not modify it: copy it first."""
    root = tmp_path_factory.mktemp("celeba")
    generate(root, NUM_IMAGES, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def shards(celeba_root, tmp_path_factory) -> Path:
    """JPEG shards of celeba_root that also carry 64x64 raw RGB, several shards per split."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(celeba_root, out, ShardOptions(size=64, shard_size=50), progress=False)
    return out


@pytest.fixture
def celeba_copy(celeba_root, tmp_path) -> Path:
    """A private copy of the synthetic CelebA that a test may damage."""
    dst = tmp_path / "celeba"
    shutil.copytree(celeba_root, dst)
    return dst
