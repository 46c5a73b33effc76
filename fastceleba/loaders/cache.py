"""``cache``: decode the split once into one uint8 tensor, then serve every epoch from memory.

The build reads and decodes with the turbo path (``turbo.SampleReader``) in ``num_workers``
threads; ``.rgb`` members are plain byte copies. Each epoch is the plan's permutation of that
tensor: batches are gathered, flipped and scaled to float on the fly (numpy on the CPU, torch on
a GPU, where the whole tensor lives in device memory). It has no decoder of its own and takes
orders, rank slices and padding from the plan.

Several processes on a node (``LOCAL_WORLD_SIZE`` > 1, as ``accelerate launch`` and torchrun set
it) share one copy: the split is decoded once per node, every local process filling its share of
the chunks in parallel, into a file in ``/dev/shm`` that each then maps read-only (shm.py has the
protocol, the file names and the lifecycle). Each rank still serves its own slice of the global
permutation from that one copy; with a CUDA ``device`` each rank copies it once to its GPU.
``$FASTCELEBA_CACHE_SHM`` = 1 / 0 forces sharing on or off; a single process keeps its private
array. If the shared memory cannot be had (no room in /dev/shm, no /dev/shm), the rank warns and
decodes privately.

Memory, one 64x64 image = 3*64*64 B = 12 KiB (uint8): all of CelebA (202,599 images) 2.32 GiB,
train (162,770) 1.86 GiB. For the train split on a node of 8 ranks:

    private (1 process, or sharing off)   host 1.86 GiB per rank (14.9 GiB), decoded 8 times
    shared, device cpu                    host 1.86 GiB per node, decoded once
    shared, device cuda                   host 1.86 GiB per node until close(), and 1.86 GiB per GPU
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import shm
from .base import Loader, u8_to_float
from .plan import batch_counts, split_batches
from .split import SplitData
from .turbo import SampleReader, serial_torch_thread

CHUNK = 256  # images a build task decodes (and, shared, the unit the processes split the work by)
SHARED_ENV = "FASTCELEBA_CACHE_SHM"


def share_on_node(shared: bool | None = None) -> bool:
    """Whether the cache goes to node-shared memory: ``shared`` if given, else
    $FASTCELEBA_CACHE_SHM (1/0), else whether the launcher started several local processes."""
    if shared is not None:
        return shared
    env = os.environ.get(SHARED_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class CacheLoader(Loader):
    """The split decoded once into uint8 N x 3 x size x size (RAM, or GPU memory on cuda).

    Built with the turbo path in ``num_workers`` threads (for ``.rgb`` members: a plain copy of
    the raw bytes, no decoding). Each batch is an index_select of that tensor, flipped and
    scaled to float on the fly. Memory: 12 KiB per 64x64 image (2 GB for all of CelebA train),
    once per node when several local ranks share it. ``shared``: None (default) shares when the
    launcher started several local processes (see ``share_on_node``); ``self.shared`` then says
    where the copy is and how many chunks this process decoded."""

    kind = "cache"
    threaded = True  # the build's decoding threads

    def __init__(self, sd: SplitData, progress: bool | None = None, shared: bool | None = None, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        from tqdm import tqdm

        n, s = sd.num_samples, self.size
        layout = {"images": ("uint8", (n, 3, s, s))}
        for name, dtype in sd.labels:
            width = int(np.prod(sd.members[name].get("shape", [1])))
            layout[name] = (dtype, (n,) if width == 1 else (n, width))
        chunks = -(-n // CHUNK)
        readers: list[SampleReader] = []
        opening = threading.Lock()

        def reader() -> SampleReader:  # made on first use: a process that finds the split
            with opening:              # already in shared memory never reads the shards
                if not readers:
                    readers.append(SampleReader(sd, self.member, s, self.crop))
            return readers[0]

        def fill(i: int, arrays: dict[str, np.ndarray]) -> None:
            a, b = i * CHUNK, min((i + 1) * CHUNK, n)
            rd = reader()
            arrays["images"][a:b] = rd.images(np.arange(a, b)).transpose(0, 3, 1, 2)
            for name, arr in rd.labels(np.arange(a, b)).items():
                arrays[name][a:b] = arr.reshape(arrays[name][a:b].shape)

        self.shared: dict | None = None  # shared memory: {"path", "chunks", "filled" (by us)}
        self._segment = None
        arrays = None
        if share_on_node(shared):
            if progress is None and os.environ.get("LOCAL_RANK", "0") != "0":
                progress = False
            try:
                with tqdm(total=n, unit="img", desc=f"caching {sd.split} (node-shared)",
                          disable=None if progress is None else not progress) as bar:
                    self._segment = shm.SharedArrays.open(
                        self._segment_name(), shm.Layout(self._segment_key(chunks), layout, chunks), fill,
                        workers=self.num_workers, initializer=serial_torch_thread,
                        on_chunk=lambda i: bar.update(min((i + 1) * CHUNK, n) - i * CHUNK))
            except shm.SegmentError as e:
                warnings.warn(f"cache: no node-shared memory ({e}); this rank decodes {sd.split!r} "
                              f"into its own memory", RuntimeWarning, stacklevel=2)
            else:
                arrays = dict(self._segment.arrays)
                self.shared = {"path": str(self._segment.path), "chunks": chunks,
                               "filled": self._segment.filled}
        if arrays is None:
            arrays = {k: np.empty(shape, dtype) for k, (dtype, shape) in layout.items()}
            with ThreadPoolExecutor(max(1, self.num_workers), initializer=serial_torch_thread) as pool, \
                    tqdm(total=n, unit="img", desc=f"caching {sd.split}",
                         disable=None if progress is None else not progress) as bar:
                futures = [(i, pool.submit(fill, i, arrays)) for i in range(chunks)]
                try:
                    for i, f in futures:
                        f.result()
                        bar.update(min((i + 1) * CHUNK, n) - i * CHUNK)
                finally:
                    for _, f in futures:
                        f.cancel()
        for rd in readers:
            rd.close()
        with warnings.catch_warnings():  # the shared mapping is read-only, and nothing writes it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            self.images = torch.from_numpy(arrays.pop("images")).to(self.device)
            self.labels = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}

    def view(self, *, shuffle: bool = False, flip: bool = False, drop_last: bool = False,
             batch_size: int | None = None) -> "CacheLoader":
        """Another loader over the same decoded split, with other epoch options: no decoding and no
        memory of its own. E.g. the in-order, unflipped pass over train for the mean image beside
        the shuffled, flipped training loader. The original keeps owning the shared copy."""
        other = copy.copy(self)
        other.shuffle, other.flip, other.drop_last = shuffle, flip, drop_last
        other.batch_size = batch_size or self.batch_size
        other.num_batches, other.per_rank = batch_counts(self.num_samples, other.batch_size, self.world_size,
                                                         drop_last)
        other.epoch, other._segment = 0, None
        return other

    def _segment_key(self, chunks: int) -> dict:
        """What the shared copy depends on: the split's manifest entry (every shard's sha256)
        and the decode options; it names the segment."""
        sd = self.sd
        return {"v": 1, "split": sd.split, "entry": sd.manifest["splits"][sd.split], "member": self.member,
                "size": self.size, "crop": self.crop, "chunk": CHUNK, "chunks": chunks,
                "labels": [list(x) for x in sd.labels]}

    def _segment_name(self) -> str:
        key = self._segment_key(-(-self.num_samples // CHUNK))
        return f"{shm.PREFIX}u{os.getuid()}-{self.sd.split}-{shm.digest(key)}"

    def close(self) -> None:
        """Stop using the node-shared copy; its last user removes it (this also happens at exit).
        On the CPU the loader keeps working from its mapping. On a GPU, which has its own copy,
        the host mapping is dropped too: call it once every local rank has made its loader (e.g.
        after a barrier), or a late rank finds no segment and decodes the split again."""
        if self._segment is not None:
            self._segment.close()
            if self.device.type != "cpu":
                self._segment = None  # the mapping goes with the last reference to it

    def _run_epoch(self, epoch: int, start: int):
        idx, valid = self._plan(epoch, start)
        flips = self._flips(epoch)[idx]
        dev = self.device
        if dev.type == "cpu":
            yield from self._run_epoch_numpy(idx, valid, flips)
            return
        idx_t = torch.from_numpy(idx).to(dev)
        valid_t = torch.from_numpy(valid).to(dev)
        flips_t = torch.from_numpy(flips).to(dev)
        for s in split_batches(len(idx), self.batch_size):
            rows = idx_t[s]
            x = u8_to_float(self.images.index_select(0, rows))
            if self.flip:
                x = torch.where(flips_t[s][:, None, None, None], x.flip(-1), x)
            batch = {"image": x}
            for name, t in self.labels.items():
                batch[name] = t.index_select(0, rows)
            batch["valid"] = valid_t[s]
            yield batch

    def _run_epoch_numpy(self, idx: np.ndarray, valid: np.ndarray, flips: np.ndarray):
        """CPU batches with numpy: single-threaded gather + scale (~0.6 ms per 128 images), so
        they never compete with torch's intra-op threads (the training step's) for the cores."""
        images = self.images.numpy()
        labels = {k: v.numpy() for k, v in self.labels.items()}
        for s in split_batches(len(idx), self.batch_size):
            rows = idx[s]
            x = np.empty((len(rows), 3, self.size, self.size), np.float32)
            np.divide(images[rows], np.float32(255), out=x, dtype=np.float32)
            if flips[s].any():
                f = np.flatnonzero(flips[s])
                x[f] = x[f, :, :, ::-1]
            batch = {"image": torch.from_numpy(x)}
            for name, arr in labels.items():
                batch[name] = torch.from_numpy(arr[rows])
            batch["valid"] = torch.from_numpy(valid[s].copy())
            yield batch


