"""The DALI pipeline behind ``make_loader("dali", ...)``.

One graph, two placements:

    webdataset reader (cpu) -> image decoder ("cpu", or "mixed" = nvJPEG on a GPU)
        -> [decode only the centre crop x crop window when ``crop`` is set]
        -> resize shorter side to ``size`` (antialiased linear, like PIL's BILINEAR downscale)
        -> crop_mirror_normalize: centre size x size crop, optional coin-flip mirror,
           scale to [0, 1], HWC -> CHW, float32 (one fused op)

For ``.rgb`` shards (already ``size x size x 3`` uint8) the decoder and resize are skipped: the raw
bytes are reshaped to HWC and go straight to crop_mirror_normalize (a no-op crop).

``build_pipeline`` only *defines* the graph; nothing touches a GPU until the pipeline is built
(DALIGenericIterator builds it). ``graph_ops`` lists the operators of a defined graph with the
device each runs on, so a test on a machine without a GPU can still check that the GPU graph
decodes with the "mixed" (nvJPEG) decoder and crops/normalizes on "gpu".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nvidia.dali import Pipeline, fn, types

# DALI dtype of every binary member we read (manifest dtype name -> DALI type)
DALI_DTYPES = {"uint8": types.UINT8, "int8": types.INT8, "int16": types.INT16, "int32": types.INT32}


@dataclass(frozen=True)
class OpInfo:
    """One operator of a defined graph: its instance name, DALI schema name and device."""

    name: str
    schema: str
    device: str


def build_pipeline(
    paths: Sequence[str],
    index_paths: Sequence[str],
    *,
    batch_size: int,
    member: str = "jpg",
    labels: Sequence[tuple[str, str]] = (("num", "int32"),),
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 2,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    initial_fill: int = 1024,
    size: int = 64,
    crop: int | None = None,
    flip: bool = False,
    prefetch_queue_depth: int = 2,
) -> Pipeline:
    """Define (do not build) the DALI graph. Outputs: image (float32 CHW in [0, 1]), then one
    output per ``labels`` entry (member extension, manifest dtype), in that order.

    ``device="gpu"`` needs ``device_id``; decode then runs on "mixed" (nvJPEG) and everything
    after it on "gpu", and the labels are copied to the GPU too. ``device="cpu"`` uses only CPU
    operators and a pipeline without a device (``device_id=None``).

    The reader pads its shard by repeating the last sample (``pad_last_batch``) so every shard
    yields the same number of batches; ``stick_to_shard`` keeps ``shard_id`` fixed, because the
    loader picks each epoch's shard assignment and shuffle seed itself (see fastceleba.loaders).
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id")
    if member not in ("jpg", "rgb"):
        raise ValueError(f"member must be 'jpg' or 'rgb', not {member!r}")
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    exts = [member] + [name for name, _ in labels]
    dtypes = [types.UINT8] + [DALI_DTYPES[dtype] for _, dtype in labels]
    with pipe:
        outs = fn.readers.webdataset(
            paths=list(paths),
            index_paths=list(index_paths),
            ext=exts,
            dtypes=dtypes,
            missing_component_behavior="error",  # a sample without its image or labels is a broken shard
            shard_id=shard_id,
            num_shards=num_shards,
            stick_to_shard=True,
            pad_last_batch=True,
            random_shuffle=shuffle,
            initial_fill=initial_fill,
            seed=seed,
            name="Reader",
        )
        data, label_nodes = outs[0], list(outs[1:])
        if member == "jpg":
            decoder = "mixed" if device == "gpu" else "cpu"
            if crop is not None:
                # ROI decode: only the centre crop x crop window is decoded
                img = fn.decoders.image_crop(
                    data, device=decoder, output_type=types.RGB,
                    crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5,
                )
            else:
                img = fn.decoders.image(data, device=decoder, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=size, antialias=True, interp_type=types.INTERP_LINEAR)
        else:
            img = fn.reshape(data, shape=[size, size, 3], layout="HWC")
            if device == "gpu":
                img = img.gpu()
        mirror = fn.random.coin_flip(probability=0.5, seed=seed + 1) if flip else 0
        img = fn.crop_mirror_normalize(
            img,
            device=device,
            crop=(size, size),
            crop_pos_x=0.5,
            crop_pos_y=0.5,
            mirror=mirror,
            mean=[0.0],
            std=[255.0],
            output_layout="CHW",
            dtype=types.FLOAT,
        )
        if device == "gpu":
            label_nodes = [node.gpu() for node in label_nodes]
        pipe.set_outputs(img, *label_nodes)
    return pipe


def output_devices(pipe: Pipeline) -> list[str]:
    """Device ("cpu" or "gpu") of each output of a defined pipeline."""
    outputs = getattr(pipe, "_graph_out", None)
    if outputs is None:
        raise ValueError("the pipeline has no graph yet; define it with build_pipeline first")
    return [node.device for node in outputs]


def graph_ops(pipe: Pipeline) -> list[OpInfo]:
    """The operators of a defined (not necessarily built) pipeline, outputs first.

    Walks the graph from the pipeline's outputs; works without a GPU. DALI 2.x has no public
    inspection API for an unbuilt graph (``serialize()`` and ``save_graph_to_dot_file()`` build the
    pipeline, which needs CUDA for a GPU graph), so this reads the graph nodes' attributes.
    """
    outputs = getattr(pipe, "_graph_out", None)
    if outputs is None:
        raise ValueError("the pipeline has no graph yet; define it with build_pipeline first")
    found: dict[int, OpInfo] = {}
    stack = list(outputs)
    while stack:
        node = stack.pop(0)
        inst = node.source
        if inst is None or inst.id in found:
            continue
        found[inst.id] = OpInfo(inst.name, type(inst._op).__name__, inst._op.device)
        stack.extend(inst.inputs)
        # argument inputs (e.g. the coin flip feeding `mirror`)
        stack.extend(v for v in getattr(inst, "_kwargs", {}).values() if hasattr(v, "source"))
    return list(found.values())
