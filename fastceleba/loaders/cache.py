"""``cache``: decode the split once into one uint8 tensor, then serve every epoch from memory.

The build reads and decodes with the turbo path (``turbo.SampleReader``) in ``num_workers``
threads; ``.rgb`` members are plain byte copies. Each epoch is the plan's permutation of that
tensor: batches are gathered, flipped and scaled to float on the fly (numpy on the CPU, torch on
a GPU, where the whole tensor lives in device memory). It has no decoder of its own and takes
orders, rank slices and padding from the plan.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .base import Loader, u8_to_float
from .plan import split_batches
from .split import SplitData
from .turbo import SampleReader, serial_torch_thread


class CacheLoader(Loader):
    """The split decoded once into uint8 N x 3 x size x size (RAM, or GPU memory on cuda).

    Built with the turbo path in ``num_workers`` threads (for ``.rgb`` members: a plain copy of
    the raw bytes, no decoding). Each batch is an index_select of that tensor, flipped and
    scaled to float on the fly. Memory: 12 KiB per 64x64 image (2 GB for all of CelebA train)."""

    kind = "cache"

    def __init__(self, sd: SplitData, progress: bool | None = None, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        from tqdm import tqdm

        n, s = sd.num_samples, self.size
        reader = SampleReader(sd, self.member, s, self.crop)
        images = np.empty((n, 3, s, s), np.uint8)
        labels: dict[str, list] = {name: [] for name, _ in sd.labels}

        def fill(a: int, b: int) -> dict[str, np.ndarray]:
            images[a:b] = reader.images(np.arange(a, b)).transpose(0, 3, 1, 2)
            return reader.labels(np.arange(a, b))

        step = 256
        with ThreadPoolExecutor(max(1, self.num_workers), initializer=serial_torch_thread) as pool, \
                tqdm(total=n, unit="img", desc=f"caching {sd.split}",
                     disable=None if progress is None else not progress) as bar:
            futures = [(a, pool.submit(fill, a, min(a + step, n))) for a in range(0, n, step)]
            try:
                for a, f in futures:
                    for name, arr in f.result().items():
                        labels[name].append(arr)
                    bar.update(min(a + step, n) - a)
            finally:
                for _, f in futures:
                    f.cancel()
        reader.close()
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = {k: torch.from_numpy(np.concatenate(v)).to(self.device) for k, v in labels.items()}

    def _run_epoch(self, epoch: int):
        idx, valid = self._plan(epoch)
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


