"""The DALI graph: GPU placement checked without a GPU, and the CPU graph run for real."""

from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from fastceleba.loaders.dali import build_pipeline, graph_ops, output_devices
from fastceleba.shards import load_manifest, shard_paths, split_keys

LABELS = [("num", "int32"), ("attr", "int8"), ("ident", "int32")]


def _paths(shards, split="train"):
    pairs = shard_paths(shards, split)
    return [str(t) for t, _ in pairs], [str(i) for _, i in pairs]


def _by_schema(ops):
    return {op.schema: op.device for op in ops}


@pytest.mark.parametrize("crop", [None, 148])
def test_gpu_graph_decodes_with_nvjpeg_and_stays_on_gpu(shards, crop):
    tars, idx = _paths(shards)
    pipe = build_pipeline(tars, idx, batch_size=8, labels=LABELS, device="gpu", device_id=0,
                          crop=crop, flip=True)  # defined only: no CUDA needed
    ops = _by_schema(graph_ops(pipe))
    decoder = "ImageCrop" if crop else "Image"
    assert ops[decoder] == "mixed"          # nvJPEG: host parse, GPU decode
    assert ops["Resize"] == "gpu"
    assert ops["CropMirrorNormalize"] == "gpu"
    assert ops["Webdataset"] == "cpu"       # the reader always runs on the CPU
    assert output_devices(pipe) == ["gpu"] * (1 + len(LABELS))  # labels copied to the GPU too


def test_cpu_graph_uses_only_cpu_operators(shards):
    tars, idx = _paths(shards)
    pipe = build_pipeline(tars, idx, batch_size=8, labels=LABELS, device="cpu", flip=True)
    ops = graph_ops(pipe)
    assert {op.device for op in ops} == {"cpu"}
    assert _by_schema(ops)["Image"] == "cpu"
    assert output_devices(pipe) == ["cpu"] * (1 + len(LABELS))


def test_rgb_graph_skips_decode_and_resize(shards):
    tars, idx = _paths(shards)
    pipe = build_pipeline(tars, idx, batch_size=8, member="rgb", labels=LABELS, device="gpu", device_id=0)
    ops = _by_schema(graph_ops(pipe))
    assert "Image" not in ops and "Resize" not in ops
    assert ops["Reshape"] == "cpu" and ops["CropMirrorNormalize"] == "gpu"


def test_gpu_graph_needs_a_device_id(shards):
    tars, idx = _paths(shards)
    with pytest.raises(ValueError, match="device_id"):
        build_pipeline(tars, idx, batch_size=8, device="gpu")


@pytest.mark.parametrize("member", ["jpg", "rgb"])
def test_cpu_pipeline_runs_one_epoch(shards, member):
    tars, idx = _paths(shards, "valid")
    pipe = build_pipeline(tars, idx, batch_size=10, member=member, labels=LABELS, device="cpu")
    it = DALIGenericIterator(pipe, ["image", "num", "attr", "ident"], reader_name="Reader",
                             last_batch_policy=LastBatchPolicy.FILL)
    n = len(split_keys(shards, "valid"))
    nums, images = [], []
    for out in it:
        d = out[0]
        assert d["image"].shape == (10, 3, 64, 64) and str(d["image"].dtype) == "torch.float32"
        assert str(d["num"].dtype) == "torch.int32" and d["num"].shape == (10, 1)
        assert str(d["attr"].dtype) == "torch.int8" and d["attr"].shape == (10, 40)
        assert set(d["attr"].unique().tolist()) <= {-1, 1}
        nums += d["num"].flatten().tolist()
        images.append(d["image"])
    x = np.concatenate([i.numpy() for i in images])
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # real pictures, scaled to [0, 1]
    # padded to whole batches by repeating the last sample; the first n are the split, once each
    assert len(nums) == -(-n // 10) * 10
    expected = {int(k.split(".")[0]) for k in split_keys(shards, "valid")}
    assert sorted(nums[:n]) == sorted(expected)
    assert set(nums[n:]) <= {nums[n - 1]}
    assert load_manifest(shards)["splits"]["valid"]["num_samples"] == n
