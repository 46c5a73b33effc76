"""``dali``: NVIDIA DALI reads, decodes and augments; ``DaliLoader`` runs its graph for the epoch plan.

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

import torch
from nvidia.dali import Pipeline, fn, types

from ..errors import DataError
from .base import Loader
from .plan import epoch_order, epoch_seed, rank_slice
from .split import SplitData

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
    loader picks each epoch's shard assignment and shuffle seed itself (``DaliLoader``).
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


class DaliLoader(Loader):
    """``build_pipeline`` + DALIGenericIterator.

    Each epoch uses a pipeline built for it: the tar order is permuted and the reader's shuffle
    and flip seeds derived from (seed, epoch), and rank r reads DALI shard (r + epoch) % W, so an
    epoch's order depends on (seed, epoch) only. Without shuffle or flip every epoch is the same
    and one pipeline serves them all. The reader pads each rank's shard by repeating its last
    sample (pad_last_batch) and the iterator runs LastBatchPolicy.FILL (DROP for drop_last);
    this loader trims the last batch to the common size and marks padding invalid.

    Do not pass this loader (or its DALIGenericIterator) through accelerator.prepare(): DALI
    already reads only this rank's shard and puts the tensors on this rank's GPU; prepare()
    would wrap it in a second sharding layer and drop or duplicate samples.
    """

    kind = "dali"

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        self._iter = None
        self._iter_epoch: int | None = None
        self._reusable = not (self.shuffle or self.flip)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.threads = max(1, self.num_workers)

    def _build(self, epoch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        sd, W = self.sd, self.world_size
        order = epoch_order(len(sd.shards), self.shuffle, self.seed, epoch)
        shard_id = (self.rank + epoch) % W if self.shuffle else self.rank
        self._shard_id = shard_id
        gpu = self.device.type == "cuda"
        pipe = build_pipeline(
            [str(sd.shards[i][0]) for i in order], [str(sd.shards[i][1]) for i in order],
            batch_size=self.batch_size, member=self.member, labels=sd.labels,
            device="gpu" if gpu else "cpu", device_id=self.device_id if gpu else None,
            num_threads=self.threads, shard_id=shard_id, num_shards=W, shuffle=self.shuffle,
            seed=epoch_seed(self.seed, epoch, 3), size=self.size, crop=self.crop, flip=self.flip,
        )
        names = ["image"] + [name for name, _ in sd.labels]
        try:
            it = DALIGenericIterator(
                pipe, names, reader_name="Reader", auto_reset=False,
                last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.FILL,
            )
        except RuntimeError as e:
            raise self._error(e) from None
        if len(it) != self.num_batches:  # our plan and DALI's must agree, or samples go missing
            raise RuntimeError(f"DALI yields {len(it)} batches per epoch, expected {self.num_batches}")
        return it

    def _error(self, e: BaseException) -> DataError:
        first = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
        return DataError(f"{self.sd.root}: DALI cannot read split {self.sd.split!r} ({first[:300]}); "
                         f"run `python tools/shard.py --verify {self.sd.root}`")

    def _run_epoch(self, epoch: int):
        if self._iter is None or not (self._reusable and self._iter_epoch is not None):
            self._iter = None  # release the previous pipeline first
            self._iter = self._build(epoch)
        it, self._iter_epoch = self._iter, None  # not reusable until this epoch completes
        lo, hi = rank_slice(self.num_samples, self._shard_id, self.world_size)
        real = hi - lo
        B, labels = self.batch_size, [name for name, _ in self.sd.labels]
        k = 0
        try:
            for out in it:
                d = out[0]
                n = min(B, self.per_rank - k * B)
                batch = {"image": d["image"][:n]}
                for name in labels:
                    t = d[name][:n]
                    batch[name] = t.reshape(n) if t.shape[1] == 1 else t
                batch["valid"] = (torch.arange(k * B, k * B + n) < real).to(batch["image"].device)
                k += 1
                yield batch
        except RuntimeError as e:
            self._iter = None
            raise self._error(e) from None
        self._iter_epoch = epoch


