"""``dali``: NVIDIA DALI decodes and augments the batches of the epoch plan.

One graph per loader, built once and kept across epochs, in two placements:

    external source (cpu): this rank's planned samples, as encoded bytes + per-sample flip + ROI
        -> image decoder ("cpu", or "mixed" = nvJPEG on a GPU; EXIF orientation ignored, as PIL)
        -> resize the ROI (``transforms.crop_box``: torchvision's crop/resize/crop window) to
           ``size x size`` (antialiased linear, PIL's BILINEAR downscale)
        -> crop_mirror_normalize: the planned flip, scale to [0, 1], HWC -> CHW, float32

For ``.rgb`` members (already ``size x size x 3`` uint8) the decoder and resize are skipped.

Why an external source instead of DALI's webdataset reader: the reader shuffles within a buffer
and shards by its own rule, so an exact epoch order needed a new pipeline every epoch (new nvJPEG
handles and device buffers each time). Feeding the plan's samples ourselves keeps one pipeline for
the loader's life, gives DALI the very order, rank slice, padding and flips every other kind uses
(plan.py), and lets this module name the shard and member of a JPEG that fails to decode. The bytes
are read with os.pread at the DALI ``.idx`` offsets (``split.TarMembers``), ~10 us a sample.

Labels never pass through DALI: the whole split's labels and each epoch's plan are copied to the
device once, and each batch gathers its rows there (no per-step host-to-device copy).

``build_pipeline`` only *defines* the graph; nothing touches a GPU until the pipeline is built
(DALIGenericIterator builds it). ``graph_ops`` lists the operators of a defined graph with the
device each runs on, so a test on a machine without a GPU can still check that the GPU graph
decodes with the "mixed" (nvJPEG) decoder and resizes/normalizes on "gpu".
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import simplejpeg
import torch
from nvidia.dali import Pipeline, fn, types

from ..errors import DataError
from ..transforms import check_geometry, crop_box
from .base import DEFAULT_WORKERS, Loader, cores_per_local_rank
from .plan import split_batches
from .split import SplitData, TarMembers

# Share of JPEGs the A100/H100 hardware decoder takes (the rest: nvJPEG's CUDA decoder, with the
# Huffman stage on the pipeline's CPU threads, since CelebA's images are far below
# hybrid_huffman_threshold). DALI's default is 0.65; 0.75 is NVIDIA's suggestion for H100-class
# chips with several decoder engines. Unmeasured here (no GPU): bench/gpu_check.py reports it.
HW_DECODER_LOAD = 0.75


@dataclass(frozen=True)
class OpInfo:
    """One operator of a defined graph: its instance name, DALI schema name, device and the
    arguments it was given (scalar ones; argument inputs fed by other nodes are not listed)."""

    name: str
    schema: str
    device: str
    args: dict = field(default_factory=dict, compare=False)


def build_pipeline(
    source: Iterable,
    *,
    batch_size: int,
    member: str = "jpg",
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 2,
    size: int = 64,
    prefetch_queue_depth: int = 2,
) -> Pipeline:
    """Define (do not build) the DALI graph. Output: image, float32 CHW in [0, 1].

    ``source`` is an iterable whose every ``iter()`` is one epoch of batches (at most
    ``batch_size`` samples each): ``(data, mirror, roi_start, roi_end)`` for "jpg" (encoded JPEGs
    as uint8 arrays, int32 flip flags, float32 (y, x) corners of the window of the full image to
    resize), ``(data, mirror)`` for "rgb" (raw ``size x size x 3`` bytes).

    ``device="gpu"`` needs ``device_id``; decode then runs on "mixed" (nvJPEG) and everything
    after it on "gpu". ``device="cpu"`` uses only CPU operators and no device (``device_id=None``).
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs a device_id")
    if member not in ("jpg", "rgb"):
        raise ValueError(f"member must be 'jpg' or 'rgb', not {member!r}")
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads,
                    device_id=device_id if device == "gpu" else None,
                    prefetch_queue_depth=prefetch_queue_depth)
    with pipe:
        jpg = member == "jpg"
        data, mirror, *roi = fn.external_source(
            source=source, num_outputs=4 if jpg else 2, batch=True, cycle="raise",
            dtype=[types.UINT8, types.INT32] + ([types.FLOAT, types.FLOAT] if jpg else []),
        )
        if jpg:
            decoder = dict(device="mixed", hw_decoder_load=HW_DECODER_LOAD,
                           jpeg_fancy_upsampling=True) if device == "gpu" else dict(device="cpu")
            # fancy upsampling: the mixed decoder's chroma then matches libjpeg-turbo's (PIL's)
            img = fn.decoders.image(data, output_type=types.RGB, adjust_orientation=False, **decoder)
            img = fn.resize(img, size=[size, size], roi_start=roi[0], roi_end=roi[1],
                            roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
        else:
            img = fn.reshape(data, shape=[size, size, 3], layout="HWC")
            if device == "gpu":
                img = img.gpu()
        img = fn.crop_mirror_normalize(img, device=device, mirror=mirror, mean=[0.0], std=[255.0],
                                       output_layout="CHW", dtype=types.FLOAT)
        pipe.set_outputs(img)
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
        args = {k: v for k, v in (getattr(inst._op, "_init_args", None) or {}).items() if not k.startswith("_")}
        found[inst.id] = OpInfo(inst.name, type(inst._op).__name__, inst._op.device, args)
        stack.extend(inst.inputs)
        # argument inputs (e.g. the planned flips feeding `mirror`)
        stack.extend(v for v in getattr(inst, "_kwargs", {}).values() if hasattr(v, "source"))
    return list(found.values())


def pipeline_threads(num_workers: int | None, gpu: bool) -> int:
    """The pipeline's CPU threads: ``num_workers`` when given (at least one), so a benchmark gives every
    loader the same; when not, on a GPU this process's share of the cores (nvJPEG's host stages, parsing
    and Huffman decoding, run on them), on the CPU ``DEFAULT_WORKERS``."""
    if num_workers is not None:
        return max(1, num_workers)
    return cores_per_local_rank() if gpu else DEFAULT_WORKERS


class _Feed:
    """What DALI's external source pulls: every ``iter()`` is one epoch, the batches the loader
    planned (sample indices and flips), read from the tars. It holds no reference to the loader or
    the pipeline: the pipeline holds it, and a cycle back would keep DALI's threads alive after the
    loader is gone (and a DataLoader forking its workers next to them crashes them)."""

    def __init__(self, tar: TarMembers, member: str, size: int, crop: int | None, root: str, threads: int):
        self.tar, self.member, self.size, self.crop, self.root = tar, member, size, crop, root
        self.ext = tar.sd.ext(member)
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []  # the epoch being fed
        self.stop = False             # set to end the current epoch early
        self.in_flight: deque = deque()  # sample indices of the batches fed but not handed out yet
        self.checked = np.zeros(tar.sd.num_samples, bool)  # JPEGs whose entropy data passed
        self.threads = threads

    def __iter__(self):
        with ThreadPoolExecutor(self.threads, thread_name_prefix="dali-check") as pool:
            yield from self._batches(pool)

    def _batches(self, pool: ThreadPoolExecutor):
        for rows, flips in self.batches:
            if self.stop:
                return
            data = [np.frombuffer(self.tar.read(int(i), self.ext), np.uint8) for i in rows]
            self.in_flight.append(rows)
            if self.member == "rgb":
                yield data, flips
                continue
            self._check(pool, rows, data)
            roi = np.array([self._window(int(i), blob) for i, blob in zip(rows, data)], np.float32)
            yield data, flips, roi[:, :2].copy(), roi[:, 2:].copy()

    def _check(self, pool: ThreadPoolExecutor, rows: np.ndarray, data: list[np.ndarray]) -> None:
        """nvJPEG and DALI's CPU decoder turn corrupt entropy data into grey or noise without an
        error, where libjpeg-turbo (pil, wds, turbo) refuses it. So the first time this loader
        reads a sample, libjpeg-turbo decodes it at 1/8 scale (the whole entropy stream, almost no
        IDCT: ~0.1 ms per image per core, in threads); later epochs skip the check."""
        todo = [j for j, i in enumerate(rows) if not self.checked[i]]

        def check(j: int) -> str | None:
            try:
                simplejpeg.decode_jpeg(data[j], min_height=1, min_width=1)
            except ValueError as e:
                return str(e)
            return None

        for j, error in zip(todo, pool.map(check, todo)):
            if error is not None:
                raise DataError(f"{self.tar.where(int(rows[j]))}: .jpg member does not decode ({error}); "
                                f"run `python tools/shard.py --verify {self.root}`")
        self.checked[rows] = True

    def _window(self, i: int, blob: np.ndarray) -> tuple[float, float, float, float]:
        """(y0, x0, y1, x1) of sample i: the reference's crop/resize/crop window (transforms.crop_box)."""
        try:
            h, w = simplejpeg.decode_jpeg_header(blob)[:2]
        except ValueError as e:
            raise DataError(f"{self.tar.where(i)}: not a JPEG ({e}); run "
                            f"`python tools/shard.py --verify {self.root}`") from None
        check_geometry(h, w, self.size, self.crop, self.tar.where(i))
        x0, y0, x1, y1 = crop_box(h, w, self.size, self.crop)
        return y0, x0, y1, x1

    def bad_sample(self) -> tuple[int, str] | None:
        """The first sample of the batches in flight whose JPEG libjpeg-turbo rejects, if any."""
        if self.member != "jpg":
            return None
        for rows in self.in_flight:
            for i in rows:
                try:
                    simplejpeg.decode_jpeg(self.tar.read(int(i), "jpg"))
                except ValueError as e:
                    return int(i), str(e)
        return None


class DaliLoader(Loader):
    """``build_pipeline`` + DALIGenericIterator, fed this rank's epoch plan; one pipeline for life.

    Each ``iter()`` restarts the external source on the current epoch's plan. An epoch left early
    (a ``break`` in the training loop, a picture of the first batch) stops the source and drains the
    few batches DALI has prefetched, so the next epoch starts clean without a rebuild.

    Do not pass this loader (or its DALIGenericIterator) through accelerator.prepare(): it already
    reads only this rank's share and puts the tensors on this rank's GPU.
    """

    kind = "dali"
    threaded = True

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        self.gpu = self.device.type == "cuda"
        self.threads = self.num_workers = pipeline_threads(self.num_workers, self.gpu)
        if self.gpu:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        tar = TarMembers(sd, [sd.ext(self.member)] + [name for name, _ in sd.labels])
        self.labels = {k: torch.from_numpy(v).to(self.device) for k, v in tar.labels().items()}
        self.feed = _Feed(tar, self.member, self.size, self.crop, str(sd.root), self.threads)
        self._iter = None

    def close(self) -> None:
        """Drop the pipeline (DALI's device buffers shrink only when it goes); the next iter()
        builds a new one. For loaders used once in a while, such as evaluation's."""
        self._iter = None

    def _start(self, idx: np.ndarray, flips: np.ndarray):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        feed = self.feed
        feed.batches = [(idx[s], flips[s]) for s in split_batches(len(idx), self.batch_size)]
        feed.stop = False
        feed.in_flight.clear()
        if self._iter is None:
            pipe = build_pipeline(feed, batch_size=self.batch_size, member=self.member,
                                  device="gpu" if self.gpu else "cpu", device_id=self.device_id,
                                  num_threads=self.threads, size=self.size)
            # builds the pipeline and feeds the first batches
            self._iter = DALIGenericIterator(pipe, ["image"], auto_reset=False, prepare_first_batch=True)
        else:
            self._iter.reset()
        return self._iter

    def _run_epoch(self, epoch: int, start: int):
        idx, valid = self._plan(epoch, start)
        flips = self._flips(epoch)[idx].astype(np.int32)
        dev = self.device
        idx_t = torch.from_numpy(idx).to(dev, non_blocking=True)     # once per epoch, then sliced
        valid_t = torch.from_numpy(valid).to(dev, non_blocking=True)
        it = self._call(lambda: self._start(idx, flips))
        done = 0
        try:
            for s in split_batches(len(idx), self.batch_size):
                out = self._call(lambda: next(it))
                self.feed.in_flight.popleft()
                rows = idx_t[s]
                batch = {"image": out[0]["image"]}
                for name, t in self.labels.items():
                    batch[name] = t.index_select(0, rows)
                batch["valid"] = valid_t[s]
                done += 1
                yield batch
        finally:
            if self._iter is not None and (done < self.num_batches - start or not self._finish(it)):
                self._abandon(it)

    def _finish(self, it) -> bool:
        """True once DALI has signalled the end of the epoch (the next restart is then clean)."""
        try:
            next(it)
        except StopIteration:
            return True
        except RuntimeError:
            return False
        return False

    def _abandon(self, it) -> None:
        """End the current epoch early: stop the source and drain what DALI prefetched."""
        self.feed.stop = True
        try:
            for _ in it:
                pass
        except RuntimeError:  # a broken pipeline: build a fresh one next epoch
            self._iter = None

    def _call(self, step):
        """Run a DALI step; a failure caused by a bad JPEG of the batches in flight becomes a
        DataError naming the shard and member; any other error (CUDA, nvJPEG start-up, out of
        memory, a driver too old) passes through with its own message."""
        try:
            return step()
        except DataError:  # raised by the feed (a bad JPEG, a crop larger than an image)
            self._iter = None
            raise
        except RuntimeError as e:
            self._iter = None
            bad = self.feed.bad_sample()
            if bad is None:
                raise
            raise DataError(f"{self.feed.tar.where(bad[0])}: .{self.member} member does not decode "
                            f"({bad[1]}); run `python tools/shard.py --verify {self.sd.root}`") from e
