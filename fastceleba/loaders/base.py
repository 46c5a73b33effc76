"""What every loader kind shares: the ``Loader`` base class and the batch helpers.

``Loader`` holds the options, counts batches with the epoch plan (``plan.py``) and turns
``iter()`` into "run the current epoch, then move on". The helpers convert uint8 images to the
float32 [0, 1] batches of the contract and move batches to the device. Nothing here reads files.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError
from ..shards import MANIFEST
from .plan import WORKER_STREAM, batch_counts, epoch_flips, epoch_order, epoch_seed, rank_plan
from .split import SplitData


class Loader:
    """What make_loader returns: ``len()`` batches per epoch on this rank, ``iter()`` one epoch."""

    kind = "?"
    threaded = False  # workers are threads in this process (turbo, cache, dali), not forked processes

    def __init__(self, sd: SplitData | None, num_samples: int, batch_size: int, *, member: str,
                 device: torch.device, shuffle: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int, num_workers: int, crop: int | None, flip: bool, size: int):
        self.sd, self.num_samples, self.batch_size = sd, num_samples, batch_size
        self.member, self.device = member, device
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.crop, self.flip, self.size = crop, flip, size
        self.epoch, self.start_batch = 0, 0
        # For a GPU, images cross the bus as uint8 (4x fewer bytes than float32) and are converted
        # there; on the CPU the loader's threads convert while the training thread computes.
        self.u8_transfer = device.type != "cpu"
        self.num_batches, self.per_rank = batch_counts(num_samples, batch_size, world_size, drop_last)
        if self.num_batches == 0:
            raise DataError(f"{self._where()}: {num_samples} samples over {world_size} rank(s) give no "
                            f"full batch of {batch_size} with drop_last=True; lower the batch size "
                            "or pass drop_last=False")

    def _where(self) -> str:
        return str(self.sd.root / MANIFEST) + f" split {self.sd.split!r}" if self.sd else "loader"

    @property
    def workers(self) -> int:
        """How many workers this loader really uses: threads (at least one) or processes (0: none)."""
        return max(1, self.num_workers) if self.threaded else self.num_workers

    @property
    def workers_are(self) -> str:
        return "threads" if self.threaded else "processes"

    def __len__(self) -> int:
        return self.num_batches

    def close(self) -> None:
        """Release what the loader holds between epochs (DALI's pipeline and its device memory, the
        cache's shared host copy); the next ``iter()`` sets it up again where needed."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (its order depends on seed and epoch only),
        from its batch ``start_batch`` on: a run resumed mid-epoch gets the very batches it had left."""
        if not 0 <= start_batch < self.num_batches:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.num_batches})")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        return self._run_epoch(epoch, start)

    def _run_epoch(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch``'s batches from batch ``start`` on."""
        raise NotImplementedError

    # the plan of the kinds that choose their own order (pil, turbo, cache)
    def _flips(self, epoch: int) -> np.ndarray:
        return epoch_flips(self.num_samples, self.flip, self.seed, epoch)

    def _plan(self, epoch: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, valid) of this rank's epoch from its batch ``start`` on."""
        order = epoch_order(self.num_samples, self.shuffle, self.seed, epoch)
        idx, valid = rank_plan(order, self.batch_size, self.rank, self.world_size, self.drop_last)
        return idx[start * self.batch_size:], valid[start * self.batch_size:]


def own_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator: its workers' base seed is drawn from this, not from torch's global
    RNG, which the VAE's noise draws from (a run resumed mid-epoch must find that RNG as it was saved)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, WORKER_STREAM))


def u8_to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32 in [0, 1] (the same values as ToTensor's division)."""
    return images_u8.contiguous().to(torch.float32).div_(255.0)


def hwc_to_float(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 B x H x W x 3 -> float32 B x 3 x H x W in [0, 1], divided like ToTensor (so raw .rgb
    members give pil's exact values)."""
    if out is None:  # contiguous CHW: np.divide alone would keep the input's HWC strides
        out = np.empty((len(images), 3, *images.shape[1:3]), np.float32)
    return np.divide(images.transpose(0, 3, 1, 2), np.float32(255), out=out, dtype=np.float32)


DEFAULT_WORKERS = 2  # make_loader's num_workers when none is given (DALI on a GPU: the cores)


def cores_per_local_rank() -> int:
    """CPU cores this process may use, shared with the other processes of its node
    (``LOCAL_WORLD_SIZE``, set by accelerate launch and torchrun)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``: through pinned memory without blocking for a GPU; as is on the CPU."""
    if device.type == "cpu":
        return batch
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}


def host_images(n: int, size: int, device: torch.device) -> np.ndarray:
    """An uninitialised n x size x size x 3 uint8 host buffer for a batch bound for ``device``:
    pinned (from torch's caching host allocator) when that is a GPU, so the copy needs no staging."""
    return torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=device.type == "cuda").numpy()


def u8_batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch whose image is uint8 B x H x W x 3 on the host -> the contract's batch on ``device``:
    the uint8 bytes travel (pinned, non-blocking), the layout change and float conversion run there."""
    batch = to_device(batch, device)
    batch["image"] = u8_to_float(batch["image"].permute(0, 3, 1, 2))
    return batch


def worker_error(exc: BaseException) -> DataError:
    """A DataError raised inside a DataLoader worker comes back with the worker's traceback in
    its message; keep the one-line message."""
    text = str(exc).strip().splitlines()
    last = text[-1] if text else ""
    marker = "DataError: "
    return DataError(last.split(marker, 1)[1] if marker in last else last)


