"""Every way to get batches of CelebA faces, behind one function: ``make_loader``.

    loader = make_loader("turbo", "data/shards", "train", 128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            x = batch["image"]            # float32 B x 3 x size x size in [0, 1]
            ...

Kinds (``KINDS``), one module each:

* ``pil``    (pil.py)    the seed notebook's folder Dataset + DataLoader: the benchmarks' baseline.
* ``dali``   (dali.py)   NVIDIA DALI: webdataset reader, decode on the GPU (nvJPEG, "mixed") when
                         ``device`` is cuda, else on the CPU; resize, crop, flip, scale in DALI.
* ``wds``    (wds.py)    the ``webdataset`` library, CPU decoding in DataLoader worker processes.
* ``turbo``  (turbo.py)  members read straight from the tars, libjpeg-turbo at reduced DCT scale
                         and torch's antialiased resize in a pool of GIL-free threads.
* ``cache``  (cache.py)  the split decoded once (turbo's path) into uint8 in RAM, or on the GPU
                         when ``device`` is cuda; every epoch a permutation of that tensor.

Every kind follows one epoch plan (plan.py) and opens the split the same way (split.py).
``data`` is a shard directory, or for ``wds`` only an http(s) URL or a webdataset ``pipe:``
command with ``{name}`` (fastceleba/remote.py); the other kinds need local files:
``python tools/stage.py URL DIR`` copies them, checking every sha256.

``member`` picks the image member of the shards: "jpg" (decode the original JPEG), "rgb" (the
pre-resized ``size x size`` raw pixels written by ``tools/shard.py --size N``; no decoding at all)
or "auto" (default: "rgb" when the shards carry it with the requested ``size`` and ``crop``, else
"jpg"). ``pil`` always reads the image folder.

Batches (a dict; every tensor on ``device``):

    image  float32 B x 3 x size x size in [0, 1]
    num    int32 (B,)      CelebA file number (000001.jpg -> 1)
    attr   int8 (B, 40)    -1/+1        (if the shards carry attributes; not for pil)
    ident  int32 (B,)                   (if the shards carry identities; not for pil)
    valid  bool (B,)       False marks padding

Epochs and ranks (the same rule for every kind):

* The epoch's sample order is the split's shard order, or with ``shuffle=True`` a seeded
  shuffle that is a function of ``(seed, epoch)`` only, the same on every rank: a permutation
  of the whole split for pil, turbo and cache; for the streaming kinds (dali, wds) a permuted
  tar order plus a shuffle buffer (the shards themselves are shuffled when written; wds keeps
  one buffer per DataLoader worker, so its order also depends on num_workers). ``iter(loader)``
  runs the current epoch and then moves to the next one; ``set_epoch(e)`` jumps to epoch ``e``,
  so resuming at epoch ``e`` reproduces its order. ``flip=True`` flips each image horizontally
  with probability 1/2, also a function of ``(seed, epoch)``.
* Rank ``r`` of ``world_size`` takes the contiguous slice ``[r*N//W, (r+1)*N//W)`` of the epoch
  order (DALI's own sharding rule). Slices differ by at most one sample.
* ``drop_last=False``: every rank yields ``ceil(ceil(N/W)/B)`` batches, all of ``B`` samples but
  the last, whose size ``ceil(N/W) - (batches-1)*B`` is the same on every rank. A rank with one
  sample fewer pads with a repeat of its last sample marked ``valid=False``. The valid samples
  of all ranks together are the split, each exactly once. With one rank there is no padding: a
  batch size that does not divide N just gives a smaller last batch.
* ``drop_last=True``: every rank yields ``floor(floor(N/W)/B)`` full batches, all valid; the
  remainder of each rank's slice is skipped that epoch (so a shuffled run still sees it later).
  If that is zero batches, make_loader raises DataError rather than yield nothing.
* More ranks than samples, an empty or unknown split, a missing shard, or a shard whose size
  differs from the manifest's (truncation) raise DataError when the loader is made; the
  sha256 of every shard of the split is compared with the manifest only with ``verify=True``
  (it reads every byte), and ``python tools/shard.py --verify`` checks everything.

Image agreement: every kind gives the same picture for the same ``num`` as ``pil`` up to the
resampler: the raw ``.rgb`` members and ``wds`` on JPEG use the very same PIL code (identical
pixels); ``turbo``/``cache`` on JPEG resample a DCT-downscaled decode and DALI uses its own
decoder and resampler: mean absolute difference per image below 2/255 (measured at most 0.8/255,
1.4/255 with crop=148, on the synthetic faces; a one-pixel shift gives more than 2.4/255).
tests/test_loaders.py checks this pixel by pixel.

The loaders are already sharded by rank and already put tensors on ``device``: NEVER pass them
through ``accelerator.prepare()`` (it would shard them a second time).
"""

from __future__ import annotations

import os

import torch

from ..errors import DataError
from ..remote import RemoteDir, is_remote
from ..shards import MANIFEST
from .base import DEFAULT_WORKERS, Loader
from .cache import CacheLoader
from .plan import batch_counts, epoch_seed, rank_plan, rank_slice
from .split import LABELS, SplitData, TarMembers, choose_member, open_split
from .turbo import SampleReader, TurboLoader

KINDS = ("pil", "dali", "wds", "cache", "turbo")

__all__ = ["KINDS", "DEFAULT_WORKERS", "LABELS", "Loader", "SplitData", "make_loader", "open_split", "choose_member",
           "batch_counts", "rank_plan", "rank_slice", "epoch_seed", "TarMembers", "SampleReader"]


def make_loader(kind: str, data: str | os.PathLike, split: str, batch_size: int, *,
                device: str | torch.device | None = None, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                crop: int | None = None, flip: bool = False, size: int = 64, member: str = "auto",
                folder: str | os.PathLike | None = None, verify: bool = False,
                progress: bool | None = None) -> Loader:
    """A loader of ``split`` from the shard directory ``data``; see the module docstring.

    kind: one of KINDS. data: a shard directory, or (wds only) an http(s) URL or a pipe: command
    holding {name}. member: "jpg", "rgb" or "auto" (not for pil). folder: pil's image folder
    (default: the manifest's image_dir). verify: check every shard's sha256 first. progress:
    the cache's decode progress bar (None: only on a terminal). num_workers: DataLoader worker
    processes (pil, wds) or threads (turbo, cache build, DALI), taken as given; None (default):
    DEFAULT_WORKERS (2), and for DALI on a GPU this process's share of the cores. ``loader.workers``
    says how many it uses. Never pass the result through accelerator.prepare(): it is already
    sharded by rank.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if batch_size < 1 or size < 1 or (crop is not None and crop < 1) or (num_workers or 0) < 0 or seed < 0:
        raise ValueError("batch_size, size and crop must be positive; num_workers and seed >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} asked for but CUDA is not available")
    if is_remote(data) and kind != "wds":
        raise DataError(f"{data}: the {kind} loader needs local files; stage the shards first with "
                        f"`python tools/stage.py {RemoteDir(data).quoted()} DIR --split {split}` and "
                        "pass DIR (only kind='wds' streams from a URL or pipe:)")
    sd = open_split(data, split, verify=verify)
    if sd.num_samples < world_size:
        raise DataError(f"{sd.root / MANIFEST}: split {split!r} has {sd.num_samples} samples, fewer than "
                        f"world_size={world_size} ranks; use fewer processes")
    if num_workers is None and kind != "dali":  # DALI chooses its own default (dali.pipeline_threads)
        num_workers = DEFAULT_WORKERS
    common = dict(batch_size=batch_size, device=dev, shuffle=shuffle, seed=seed, drop_last=drop_last,
                  rank=rank, world_size=world_size, num_workers=num_workers, crop=crop, flip=flip,
                  size=size)
    # pil, dali and wds are imported only when asked for: with DALI, webdataset and torchvision (which
    # pil and wds import up front for their forked workers) they add ~1.5 s to every start-up.
    if kind == "pil":
        from .pil import PilLoader
        return PilLoader(sd, folder, member="folder", **common)
    member = choose_member(sd, member, size, crop)
    if kind == "dali":
        from .dali import DaliLoader
        return DaliLoader(sd, member=member, **common)
    if kind == "wds":
        from .wds import WdsLoader
        return WdsLoader(sd, member=member, **common)
    if kind == "turbo":
        return TurboLoader(sd, member=member, **common)
    return CacheLoader(sd, progress=progress, member=member, **common)
