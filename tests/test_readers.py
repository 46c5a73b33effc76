"""Our shards read by other people's tools: Hugging Face datasets' directory loading, plain webdataset with
the keys file, webdataset workers beyond the shards; and v2 shard directories (the old keys file) still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from fastceleba.loaders import make_loader
from fastceleba.shards import MANIFEST, keys_file, verify

SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # ours -> the names datasets gives them


def keys(shards: Path, split: str) -> list[str]:
    return (shards / keys_file(split)).read_text().split()


def test_datasets_loads_the_shard_directory_as_three_webdataset_splits(shards, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = json.loads((shards / MANIFEST).read_text())
    assert len(manifest["splits"]["valid"]["shards"]) == 1  # the case the old keys file name broke
    ds = datasets.load_dataset(str(shards), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == set(SPLITS.values())
    for ours, theirs in SPLITS.items():
        assert ds[theirs].num_rows == manifest["splits"][ours]["num_samples"]
        assert ds[theirs]["__key__"] == keys(shards, ours)  # in shard order
    row = ds["validation"][0]
    raw = np.frombuffer(row["rgb8"], np.uint8).reshape(64, 64, 3)
    batch = next(iter(make_loader("cache", shards, "valid", 1, member="rgb")))
    assert int(batch["num"][0]) == int(row["__key__"]) == row["json"]["num"]
    assert np.array_equal(np.frombuffer(row["attr"], np.int8), batch["attr"][0].numpy())
    assert np.array_equal(raw.transpose(2, 0, 1), (batch["image"][0] * 255).round().byte().numpy())


def test_the_keys_file_holds_the_keys_webdataset_gives(shards):
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    wanted = set(keys(shards, "train"))
    kept = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).select(lambda s: s["__key__"] in wanted)]
    assert kept == keys(shards, "train")


def test_more_webdataset_workers_than_shards_needs_empty_check_off(shards):
    """What docs/shards.md tells plain-webdataset users: workers <= shards, or empty_check=False."""
    urls = sorted(str(p) for p in shards.glob("valid-*.tar"))
    assert len(urls) == 1

    def count(**kw) -> int:
        ds = wds.WebDataset(urls, shardshuffle=False, **kw)
        return sum(1 for _ in wds.WebLoader(ds, batch_size=None, num_workers=2))

    with pytest.raises(ValueError, match="No samples found"):
        count()
    assert count(empty_check=False) == len(keys(shards, "valid"))


def test_v2_shards_with_the_old_keys_file_still_read(shards, tmp_path):
    old = tmp_path / "v2"
    shutil.copytree(shards, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 2
    for split, entry in manifest["splits"].items():
        names = [k + ".jpg" for k in keys(old, split)]
        (old / keys_file(split)).unlink()
        (old / f"{split}.keys.txt").write_text("".join(n + "\n" for n in names))
        entry["keys"] = f"{split}.keys.txt"
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert verify(old, progress=False) == []
    for kind in ("cache", "pil"):
        loader = make_loader(kind, old, "valid", 8, member="rgb" if kind == "cache" else "auto")
        assert sorted(n for b in loader for n in b["num"].tolist()) == sorted(int(k) for k in keys(shards, "valid"))
