"""The DALI graph: GPU placement and decoder settings checked without a GPU, the CPU graph run for real."""

from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fastceleba.loaders.dali import HW_DECODER_LOAD, build_pipeline, graph_ops, output_devices
from fastceleba.shards import shard_paths, split_keys


def _by_schema(ops):
    return {op.schema: op for op in ops}


def _jpegs(shards, split="valid"):
    """The split's JPEG members, read plainly with tarfile (independent of our readers)."""
    import tarfile

    blobs = []
    for tar, _ in shard_paths(shards, split):
        with tarfile.open(tar) as tf:
            blobs += [np.frombuffer(tf.extractfile(m).read(), np.uint8) for m in tf if m.name.endswith(".jpg")]
    return blobs


class Epoch:
    """A source of one epoch: the given batches of (data, mirror[, roi_start, roi_end])."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_gpu_graph_decodes_with_nvjpeg_and_stays_on_gpu():
    pipe = build_pipeline(Epoch([]), batch_size=8, device="gpu", device_id=0)  # defined only: no CUDA
    ops = _by_schema(graph_ops(pipe))
    assert ops["Image"].device == "mixed"          # nvJPEG: host parse, GPU decode
    assert ops["Resize"].device == "gpu" and ops["CropMirrorNormalize"].device == "gpu"
    assert ops["ExternalSource"].device == "cpu"   # the plan's bytes come from the host
    assert output_devices(pipe) == ["gpu"]
    # set deliberately: the mixed decoder's chroma like libjpeg-turbo's, EXIF ignored like PIL
    decoder = ops["Image"].args
    assert decoder["jpeg_fancy_upsampling"] is True and decoder["adjust_orientation"] is False
    assert decoder["hw_decoder_load"] == HW_DECODER_LOAD
    assert ops["Resize"].args["antialias"] is True and ops["Resize"].args["size"] == [64, 64]


def test_cpu_graph_uses_only_cpu_operators():
    ops = graph_ops(build_pipeline(Epoch([]), batch_size=8, device="cpu"))
    assert {op.device for op in ops} == {"cpu"}
    assert _by_schema(ops)["Image"].args["adjust_orientation"] is False


def test_rgb_graph_skips_decode_and_resize():
    ops = _by_schema(graph_ops(build_pipeline(Epoch([]), batch_size=8, member="rgb", device="gpu",
                                              device_id=0)))
    assert "Image" not in ops and "Resize" not in ops
    assert ops["Reshape"].device == "cpu" and ops["CropMirrorNormalize"].device == "gpu"


def test_gpu_graph_needs_a_device_id():
    with pytest.raises(ValueError, match="device_id"):
        build_pipeline(Epoch([]), batch_size=8, device="gpu")


def test_cpu_pipeline_runs_epochs_of_any_batch_sizes(shards):
    """One pipeline, two epochs; the last batch of an epoch may be smaller; flips and windows are
    taken per sample from the source."""
    blobs = _jpegs(shards)
    n = len(blobs)
    roi0 = np.zeros((n, 2), np.float32)
    roi1 = np.tile(np.float32([218, 178]), (n, 1))  # the whole 178x218 image
    flips = np.arange(n, dtype=np.int32) % 2

    def batches(b):
        return [(blobs[s:s + b], flips[s:s + b], roi0[s:s + b], roi1[s:s + b]) for s in range(0, n, b)]

    pipe = build_pipeline(Epoch(batches(10)), batch_size=10, device="cpu", size=32)
    it = DALIGenericIterator(pipe, ["image"], auto_reset=True)
    for _ in range(2):
        images = [out[0]["image"] for out in it]
        assert [len(x) for x in images] == [min(10, n - s) for s in range(0, n, 10)]
        x = np.concatenate([i.numpy() for i in images])
        assert x.shape == (n, 3, 32, 32) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # real pictures, scaled to [0, 1]
    # the flip flag mirrors: the same source without flips gives the mirror images
    flips[:] = 0
    plain = np.concatenate([out[0]["image"].numpy() for out in
                            DALIGenericIterator(build_pipeline(Epoch(batches(n)), batch_size=n, device="cpu",
                                                               size=32), ["image"])])
    assert np.allclose(plain[1::2], x[1::2, :, :, ::-1]) and np.allclose(plain[::2], x[::2])
    assert len(split_keys(shards, "valid")) == n
