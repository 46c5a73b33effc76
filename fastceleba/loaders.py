"""Every way to get batches of CelebA faces, behind one function: ``make_loader``.

    loader = make_loader("turbo", "data/shards", "train", 128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            x = batch["image"]            # float32 B x 3 x size x size in [0, 1]
            ...

Kinds (``KINDS``):

* ``pil``    the seed notebook's pipeline, plainly: a Dataset over the raw image folder (the
             manifest's ``image_dir``, or ``folder=``) restricted to the split's files in natural
             order, PIL open + convert("RGB"), Resize + CenterCrop (fastceleba.transforms) +
             ToTensor, a torch DataLoader with ``num_workers`` processes. No Normalize to [-1, 1]
             (the notebook normalizes, but its models end in a sigmoid). Batches carry image, num
             (from the file name) and valid only: no attr/ident (those live in the shards).
* ``dali``   NVIDIA DALI (fastceleba.pipeline): webdataset reader over the split's tars, decode
             on the GPU (nvJPEG, "mixed") when ``device`` is cuda, else on the CPU; resize, crop,
             flip and scaling in DALI. On cuda the batches arrive on the GPU.
* ``wds``    the ``webdataset`` library with CPU decoding in DataLoader worker processes (PIL
             for JPEG, numpy for the binary members; never webdataset's default decoders, which
             can unpickle).
* ``turbo``  the fast JPEG path: members are read straight from the tars at the DALI .idx
             offsets (os.pread); libjpeg-turbo (simplejpeg) decodes each JPEG at the smallest
             power-of-two DCT scale that still covers ``size`` (178x218 -> 89x109 for size 64)
             and torch's uint8 antialiased bilinear resize (PIL's filter) finishes a chunk of
             images at once, all in a pool of ``num_workers`` threads (both release the GIL).
* ``cache``  decodes the split once (the turbo path, or just the raw bytes of ``.rgb``
             members) into one uint8 N x 3 x size x size tensor in RAM, or on the GPU when
             ``device`` is cuda; every epoch is then a permutation of that tensor.

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

import io
import math
import os
import random
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from .celeba import natural_key
from .errors import DataError
from .shards import MANIFEST, file_sha256, load_manifest, read_index, shard_paths, split_keys
from .transforms import resize_crop, resize_crop_array, resized_shape

KINDS = ("pil", "dali", "wds", "cache", "turbo")
LABELS = ("num", "attr", "ident")  # binary members that go into batches, when the shards carry them


# ---------------------------------------------------------------------------------------------
# The split on disk.

@dataclass
class SplitData:
    """One split of a shard directory, checked: its shards, per-shard counts, keys and labels."""

    root: Path
    manifest: dict
    split: str
    shards: list[tuple[Path, Path]]   # (tar, idx)
    counts: list[int]                 # samples per shard
    keys: list[str]                   # image file names, in shard order
    labels: list[tuple[str, str]]     # (member, dtype) of LABELS the shards carry

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def members(self) -> dict:
        return self.manifest["members"]


def open_split(data: str | os.PathLike, split: str, verify: bool = False) -> SplitData:
    """Check and describe a split. Cheap checks always (files exist, sizes match the manifest,
    counts agree); ``verify=True`` also compares each tar's sha256 with the manifest."""
    root = Path(data)
    manifest = load_manifest(root)
    shards = shard_paths(root, split, manifest)
    keys = split_keys(root, split, manifest)
    entry = manifest["splits"][split]
    counts = [int(s["num_samples"]) for s in entry["shards"]]
    if not (sum(counts) == len(keys) == int(entry["num_samples"])):
        raise DataError(f"{root / MANIFEST}: split {split!r} counts disagree (shards {sum(counts)}, "
                        f"keys {len(keys)}, manifest {entry['num_samples']}); re-run tools/shard.py")
    if not keys:
        raise DataError(f"{root / MANIFEST}: split {split!r} has no samples; choose another split "
                        "or re-shard with a split that gives it images")
    if verify:
        for shard, (tar, _) in zip(entry["shards"], shards):
            if file_sha256(tar) != shard["sha256"]:
                raise DataError(f"{tar}: sha256 does not match the manifest (corrupt or replaced); "
                                "delete it and re-run tools/shard.py with the same arguments")
    members = manifest["members"]
    labels = [(name, members[name]["dtype"]) for name in LABELS if name in members]
    if "num" not in members:
        raise DataError(f"{root / MANIFEST}: shards carry no .num member; re-make them with tools/shard.py")
    return SplitData(root, manifest, split, shards, counts, keys, labels)


def choose_member(sd: SplitData, member: str, size: int, crop: int | None) -> str:
    """Resolve ``member`` ("jpg", "rgb" or "auto") against what the shards hold."""
    members, manifest_path = sd.members, sd.root / MANIFEST
    rgb_ok = "rgb" in members and sd.manifest.get("size") == size and sd.manifest.get("crop") == crop
    if member == "auto":
        member = "rgb" if rgb_ok else "jpg"
    if member == "jpg" and "jpg" not in members:
        raise DataError(f"{manifest_path}: the shards hold no JPEGs (made with --no-jpeg) and their "
                        f".rgb members are {sd.manifest.get('size')} px, crop {sd.manifest.get('crop')}; "
                        f"ask for that geometry or re-shard with JPEGs")
    if member == "rgb" and not rgb_ok:
        have = (f"{sd.manifest.get('size')} px, crop {sd.manifest.get('crop')}" if "rgb" in members
                else "absent")
        raise DataError(f"{manifest_path}: .rgb members are {have} but size={size}, crop={crop} was "
                        f"asked; use member='jpg' or re-shard with --size {size}"
                        + (f" --crop {crop}" if crop else ""))
    if member not in ("jpg", "rgb"):
        raise ValueError(f"member must be 'jpg', 'rgb' or 'auto', not {member!r}")
    return member


# ---------------------------------------------------------------------------------------------
# The epoch plan shared by all kinds.

def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed that depends only on (seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``n`` ordered samples (DALI's sharding rule)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def batch_counts(n: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(batches per rank, samples per rank including padding); the same on every rank."""
    if drop_last:
        per_rank = (n // world_size) // batch_size * batch_size
    else:
        per_rank = -(-n // world_size)
    return -(-per_rank // batch_size), per_rank


def rank_plan(order: np.ndarray, batch_size: int, rank: int, world_size: int,
              drop_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, valid) of one rank's epoch, given the epoch order of all samples."""
    lo, hi = rank_slice(len(order), rank, world_size)
    _, per_rank = batch_counts(len(order), batch_size, world_size, drop_last)
    mine = order[lo:hi][:per_rank]
    pad = per_rank - len(mine)
    valid = np.ones(per_rank, bool)
    if pad:
        mine = np.concatenate([mine, np.repeat(mine[-1:], pad)])
        valid[-pad:] = False
    return mine, valid


def split_batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------
# The base class.

class Loader:
    """What make_loader returns: ``len()`` batches per epoch on this rank, ``iter()`` one epoch."""

    kind = "?"

    def __init__(self, sd: SplitData | None, num_samples: int, batch_size: int, *, member: str,
                 device: torch.device, shuffle: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int, num_workers: int, crop: int | None, flip: bool, size: int):
        self.sd, self.num_samples, self.batch_size = sd, num_samples, batch_size
        self.member, self.device = member, device
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.crop, self.flip, self.size = crop, flip, size
        self.epoch = 0
        self.num_batches, self.per_rank = batch_counts(num_samples, batch_size, world_size, drop_last)
        if self.num_batches == 0:
            raise DataError(f"{self._where()}: {num_samples} samples over {world_size} rank(s) give no "
                            f"full batch of {batch_size} with drop_last=True; lower the batch size "
                            "or pass drop_last=False")

    def _where(self) -> str:
        return str(self.sd.root / MANIFEST) + f" split {self.sd.split!r}" if self.sd else "loader"

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (its order depends on seed and epoch only)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._run_epoch(epoch)

    def _run_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    # helpers shared by the kinds that choose their own order (pil, turbo, cache)
    def _order(self, epoch: int) -> np.ndarray:
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(epoch_seed(self.seed, epoch, 0)).permutation(n)

    def _flips(self, epoch: int) -> np.ndarray:
        """Per-sample flip decisions for the epoch, indexed by sample (not by position)."""
        if not self.flip:
            return np.zeros(self.num_samples, bool)
        return np.random.default_rng(epoch_seed(self.seed, epoch, 1)).random(self.num_samples) < 0.5

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return rank_plan(self._order(epoch), self.batch_size, self.rank, self.world_size, self.drop_last)


def _to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32 in [0, 1] (the same values as ToTensor's division)."""
    return images_u8.contiguous().to(torch.float32).div_(255.0)


def _hwc_to_float(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 B x H x W x 3 -> float32 B x 3 x H x W in [0, 1], divided like ToTensor (so raw .rgb
    members give pil's exact values)."""
    if out is None:  # contiguous CHW: np.divide alone would keep the input's HWC strides
        out = np.empty((len(images), 3, *images.shape[1:3]), np.float32)
    return np.divide(images.transpose(0, 3, 1, 2), np.float32(255), out=out, dtype=np.float32)


def _put(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _worker_error(exc: BaseException) -> DataError:
    """A DataError raised inside a DataLoader worker comes back with the worker's traceback in
    its message; keep the one-line message."""
    text = str(exc).strip().splitlines()
    last = text[-1] if text else ""
    marker = "DataError: "
    return DataError(last.split(marker, 1)[1] if marker in last else last)


# ---------------------------------------------------------------------------------------------
# pil: the notebook's baseline.

class _FolderDataset(torch.utils.data.Dataset):
    """The notebook's CelebADataset, restricted to a list of names; items are (index, valid, flip)."""

    def __init__(self, folder: Path, names: list[str], size: int, crop: int | None):
        self.folder, self.names, self.size, self.crop = folder, names, size, crop

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, item: tuple[int, bool, bool]) -> dict[str, Any]:
        from torchvision.transforms import functional as TF

        index, valid, flip = item
        name = self.names[index]
        path = self.folder / name
        try:
            with Image.open(path) as raw:
                img = resize_crop(raw.convert("RGB"), self.size, self.crop)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable image ({e}); replace it or re-download CelebA") from None
        if flip:
            img = TF.hflip(img)
        return {"image": TF.to_tensor(img), "num": torch.tensor(int(name.split(".")[0]), dtype=torch.int32),
                "valid": torch.tensor(bool(valid))}


class _PlanBatches(torch.utils.data.Sampler):
    """Batch sampler yielding the loader's plan for the epoch it is told."""

    def __init__(self, loader: "PilLoader"):
        self.loader, self.epoch = loader, 0

    def __len__(self) -> int:
        return self.loader.num_batches

    def __iter__(self):
        idx, valid = self.loader._plan(self.epoch)
        flips = self.loader._flips(self.epoch)
        for s in split_batches(len(idx), self.loader.batch_size):
            yield [(int(i), bool(v), bool(flips[i])) for i, v in zip(idx[s], valid[s])]


class PilLoader(Loader):
    kind = "pil"

    def __init__(self, sd: SplitData, folder: Path | None, **kw):
        folder = Path(folder or sd.manifest["image_dir"])
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found (recorded in {sd.root / MANIFEST}); "
                            "pass folder= (bench: --folder) pointing at img_align_celeba")
        names = sorted(sd.keys, key=natural_key)  # the notebook's natsorted order
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder / missing[0]}: missing ({len(missing)} of the split's images are); "
                            "pass the folder the shards were made from")
        super().__init__(sd, len(names), **kw)
        self.folder, self.names = folder, names
        self._sampler = _PlanBatches(self)
        self._dataset = _FolderDataset(folder, names, self.size, self.crop)

    def _run_epoch(self, epoch: int):
        self._sampler.epoch = epoch
        dl = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=self._sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            for batch in dl:
                yield _put(batch, self.device)
        except DataError as e:
            raise _worker_error(e) from None


# ---------------------------------------------------------------------------------------------
# Reading members straight out of the tars (turbo, cache).

class TarMembers:
    """Random access to the members of a split's samples through the DALI .idx files."""

    def __init__(self, sd: SplitData, exts: list[str]):
        self.sd, self.exts = sd, exts
        n = sd.num_samples
        self.shard = np.empty(n, np.int32)
        self.offset = {e: np.empty(n, np.int64) for e in exts}
        self.length = {e: np.empty(n, np.int64) for e in exts}
        pos = 0
        for s, ((tar, idx), count) in enumerate(zip(sd.shards, sd.counts)):
            tar_size = tar.stat().st_size
            for found in read_index(idx, count):
                for e in exts:
                    if e not in found:
                        raise DataError(f"{idx}: a sample lacks its .{e} member; re-run tools/shard.py")
                    off, size = found[e]
                    if off + size > tar_size:
                        raise DataError(f"{tar}: member .{e} ends past the end of the file (truncated); "
                                        "re-run tools/shard.py with the same arguments")
                    self.offset[e][pos], self.length[e][pos] = off, size
                self.shard[pos] = s
                pos += 1
        self._fds = [os.open(tar, os.O_RDONLY) for tar, _ in sd.shards]

    def read(self, i: int, ext: str) -> bytes:
        """Member ``ext`` of sample ``i`` (os.pread: thread-safe, releases the GIL)."""
        return os.pread(self._fds[self.shard[i]], int(self.length[ext][i]), int(self.offset[ext][i]))

    def read_into(self, i: int, ext: str, buf: np.ndarray) -> None:
        """Member ``ext`` of sample ``i`` straight into ``buf`` (which must have its size)."""
        n = os.preadv(self._fds[self.shard[i]], [memoryview(buf)], int(self.offset[ext][i]))
        if n != self.length[ext][i] or n != buf.nbytes:
            raise DataError(f"{self.where(i)}: .{ext} member has {self.length[ext][i]} bytes, expected "
                            f"{buf.nbytes}; re-make the shards with tools/shard.py")

    def where(self, i: int) -> str:
        return f"{self.sd.shards[self.shard[i]][0]} ({self.sd.keys[i]})"

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _decode_scaled(data: bytes, size: int, crop: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """libjpeg-turbo decode at the smallest power-of-two DCT scale (1/2, 1/4, 1/8) whose crop
    window keeps its shorter side >= ``size``: 178x218 -> 89x109 for size 64.

    The 3/8 scale (67x82) decodes no faster on CelebA-like JPEGs (measured: both ~11k img/s per
    core) and, leaving the resize almost nothing to filter, doubles the difference to the
    reference (MAD 1.3/255 instead of 0.6/255), so only power-of-two scales are used.
    Returns the decoded image and the full-size (h, w)."""
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    short = min(h, w, crop) if crop else min(h, w)
    factor = 1
    while factor < 8 and short // (factor * 2) >= size:
        factor *= 2
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h / factor),
                                 min_width=math.ceil(w / factor))
    return arr, (h, w)


def _finish_one(arr: np.ndarray, full_hw: tuple[int, int], size: int, crop: int | None) -> np.ndarray:
    """One decoded (possibly DCT-scaled) image -> the reference geometry with PIL: ``crop`` centre
    crop, shorter side to ``size``, centre crop; computed in one resize with a float box."""
    h, w = full_hw
    dh, dw = arr.shape[:2]
    sy, sx = dh / h, dw / w
    ch, cw = (crop, crop) if crop else (h, w)
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    rh, rw = resized_shape(ch, cw, size)
    top2, left2 = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    y0, x0 = top + top2 * ch / rh, left + left2 * cw / rw
    box = (x0 * sx, y0 * sy, (x0 + size * cw / rw) * sx, (y0 + size * ch / rh) * sy)
    return np.array(Image.fromarray(arr).resize((size, size), Image.BILINEAR, box=box))


class SampleReader:
    """Reads samples straight from the tars and decodes them (thread-safe).

    Meant for a pool of threads: os.pread, simplejpeg's decode and torch's resize release the
    GIL, so ``num_workers`` threads keep ``num_workers`` cores busy."""

    def __init__(self, sd: SplitData, member: str, size: int, crop: int | None):
        self.sd, self.member, self.size, self.crop = sd, member, size, crop
        self.tar = TarMembers(sd, [member] + [name for name, _ in sd.labels])
        # The labels of the whole split, read once (48 bytes a sample): three fewer reads per
        # image every epoch, which is most of the per-image work on raw .rgb shards.
        self._labels = {}
        for name, dtype in sd.labels:
            raw = bytearray().join(self.tar.read(i, name) for i in range(sd.num_samples))
            arr = np.frombuffer(raw, dtype=dtype)
            self._labels[name] = arr if len(arr) == sd.num_samples else arr.reshape(sd.num_samples, -1)

    def _decode(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        data = self.tar.read(i, "jpg")
        try:
            return _decode_scaled(data, self.size, self.crop)
        except ValueError as e:
            raise DataError(f"{self.tar.where(i)}: JPEG does not decode ({e}); run "
                            f"`python tools/shard.py --verify {self.sd.root}`") from None

    def images(self, idx: np.ndarray) -> np.ndarray:
        """k x size x size x 3 uint8 (HWC) images of the samples idx."""
        s = self.size
        out = np.empty((len(idx), s, s, 3), np.uint8)
        if self.member == "rgb":
            flat = out.reshape(len(idx), -1)
            for j, i in enumerate(idx):
                self.tar.read_into(i, "rgb", flat[j])
            return out
        decoded = [self._decode(i) for i in idx]
        groups: dict[tuple, list[int]] = {}
        for j, (arr, hw) in enumerate(decoded):
            groups.setdefault((arr.shape, hw), []).append(j)
        for (_, (h, w)), js in groups.items():
            if self.crop is None:
                # Resize the whole DCT-scaled images to the reference's resized shape (same pixel
                # grid as resizing the full image), then take the centre: torch's uint8
                # antialiased bilinear resize, PIL's filter, ~14 us per image on one core.
                rh, rw = resized_shape(h, w, s)
                x = torch.from_numpy(np.stack([decoded[j][0] for j in js])).permute(0, 3, 1, 2)
                y = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
                top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
                out[js] = y[:, :, top:top + s, left:left + s].permute(0, 2, 3, 1).numpy()
            else:  # the crop window starts at a fractional pixel of the scaled image: PIL's box
                for j in js:
                    out[j] = _finish_one(decoded[j][0], (h, w), s, self.crop)
        return out

    def labels(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Each label member of the samples idx: (k,) or (k, width) arrays."""
        return {name: arr[idx] for name, arr in self._labels.items()}

    def close(self) -> None:
        self.tar.close()


def _libgomp():
    """The OpenMP runtime torch loaded (None if there is none or it cannot be found)."""
    import ctypes
    import re

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = re.findall(r"(/\S*libgomp[^/\s]*\.so[.\d]*)$", maps, flags=re.M)
    try:
        return ctypes.CDLL(paths[0]) if paths else None
    except OSError:
        return None


def serial_torch_thread() -> None:
    """Thread-pool initializer: this thread runs its torch ops on one core.

    The pool already has ``num_workers`` threads; an OpenMP team inside each would put
    num_workers x intra-op threads on the same cores and make them wait on each other. OpenMP's
    thread count is a per-thread setting, so this leaves the training thread's alone."""
    torch.ones(1 << 16).sum()  # let ATen initialise this thread's OpenMP setting first
    lib = _libgomp()
    if lib is not None:
        lib.omp_set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# turbo: threads + libjpeg-turbo, straight from the tars.

class TurboLoader(Loader):
    kind = "turbo"
    prefetch = 2  # batches in flight beyond the one being handed out

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        self.reader = SampleReader(sd, self.member, self.size, self.crop)
        self.threads = max(1, self.num_workers)

    def _fill(self, idx: np.ndarray, flips: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
        """Thread part: decode samples idx into out (k x 3 x size x size float32 in [0, 1])."""
        images = self.reader.images(idx)
        if flips.any():
            images[flips] = images[flips, :, ::-1]
        _hwc_to_float(images, out)
        return self.reader.labels(idx)

    def _submit(self, pool: ThreadPoolExecutor, idx: np.ndarray, valid: np.ndarray,
                flips: np.ndarray) -> tuple:
        out = np.empty((len(idx), 3, self.size, self.size), np.float32)
        cuts = np.linspace(0, len(idx), min(self.threads, len(idx)) + 1).astype(int)
        futures = [pool.submit(self._fill, idx[a:b], flips[a:b], out[a:b]) for a, b in zip(cuts, cuts[1:])]
        return out, valid, futures

    def _assemble(self, job: tuple) -> dict:
        out, valid, futures = job
        parts = [f.result() for f in futures]
        batch = {"image": torch.from_numpy(out)}
        for name, _ in self.sd.labels:
            batch[name] = torch.from_numpy(np.concatenate([p[name] for p in parts]))
        batch["valid"] = torch.from_numpy(valid.copy())
        return _put(batch, self.device)

    def _run_epoch(self, epoch: int):
        idx, valid = self._plan(epoch)
        flips = self._flips(epoch)[idx]
        slices = split_batches(len(idx), self.batch_size)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="turbo",
                                initializer=serial_torch_thread) as pool:
            pending: deque = deque()
            try:
                for k in range(len(slices)):
                    while len(pending) <= self.prefetch and k + len(pending) < len(slices):
                        s = slices[k + len(pending)]
                        pending.append(self._submit(pool, idx[s], valid[s], flips[s]))
                    yield self._assemble(pending.popleft())
            finally:
                for _, _, futures in pending:
                    for f in futures:
                        f.cancel()


# ---------------------------------------------------------------------------------------------
# cache: decode once, then permute a tensor.

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
            x = _to_float(self.images.index_select(0, rows))
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


# ---------------------------------------------------------------------------------------------
# wds: the webdataset library in DataLoader workers.

class _WdsEpoch(torch.utils.data.IterableDataset):
    """One epoch of one rank, split among DataLoader workers by whole batches.

    Sample-level splitting, so any number of shards, ranks and workers gives exactly-once: the
    epoch's stream (shards in epoch order, samples in tar order) is cut into rank slices (the
    common rule), each rank's slice into its batches, and each worker takes a contiguous run of
    those batches. webdataset's nodesplitter / workersplitter keep only the tars that overlap a
    rank's / worker's range; a stage after the tar reader keeps exactly the worker's samples.
    """

    def __init__(self, loader: "WdsLoader", epoch: int):
        self.loader, self.epoch = loader, epoch

    def __iter__(self):
        try:
            yield from self._batches()
        except DataError as e:
            yield {"__error__": str(e)}
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            where = next((a for a in e.args if isinstance(a, str) and a.endswith(".tar")), None)
            yield {"__error__": f"{where or self.loader.sd.root}: unreadable shard ({e.args[0]}); "
                                f"run `python tools/shard.py --verify {self.loader.sd.root}`"}

    def _batches(self):
        import webdataset as wds

        ld, sd = self.loader, self.loader.sd
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the epoch's stream: shards (maybe permuted), with each shard's first stream position
        shard_order = np.arange(len(sd.shards))
        if ld.shuffle:
            shard_order = np.random.default_rng(epoch_seed(ld.seed, self.epoch, 0)).permutation(len(sd.shards))
        urls = [str(sd.shards[i][0]) for i in shard_order]
        counts = [sd.counts[i] for i in shard_order]
        starts = dict(zip(urls, np.cumsum([0] + counts[:-1]).tolist()))
        shard_len = dict(zip(urls, counts))
        # this rank's slice and this worker's run of batches in it
        lo, hi = rank_slice(sd.num_samples, ld.rank, ld.world_size)
        nb, B = ld.num_batches, ld.batch_size
        b0, b1 = worker * nb // workers, (worker + 1) * nb // workers
        if b0 == b1:
            return
        first, last = b0 * B, min(b1 * B, ld.per_rank)  # rank-local positions of this worker
        real_lo, real_hi = lo + first, lo + min(last, hi - lo)   # its real samples [real_lo, real_hi)
        pad = max(0, last - max(first, hi - lo))                 # its padding samples (rank's last)
        want = [(real_lo, real_hi)] + ([(hi - 1, hi)] if pad else [])

        def overlapping(ranges):  # a url splitter keeping the tars that hold positions in ranges
            def keep(src):
                for item in src:
                    s, n = starts[item["url"]], shard_len[item["url"]]
                    if any(a < s + n and s < b for a, b in ranges):
                        yield item
            return keep

        stop = max(real_hi, hi if pad else 0)  # nothing this worker needs lies beyond

        def take(src):  # the worker's samples, by stream position
            url, i = None, 0
            for sample in src:
                if sample["__url__"] != url:
                    url, i = sample["__url__"], 0
                g = starts[url] + i
                i += 1
                if pad and g == hi - 1:
                    self._pad_sample = sample
                if real_lo <= g < real_hi:
                    yield sample
                if g + 1 >= stop:
                    return  # stop reading: the rest of the tar belongs to other workers

        self._pad_sample = None
        ds = wds.WebDataset(
            urls, shardshuffle=False, empty_check=False,
            nodesplitter=overlapping([(lo, hi)]), workersplitter=overlapping(want),
        ).compose(take)
        stream = ld.rank * 1000 + worker  # each (rank, worker) shuffles and flips on its own
        if ld.shuffle:
            ds = ds.shuffle(1000, initial=100, rng=random.Random(epoch_seed(ld.seed, self.epoch, 2 + stream)))
        flip_rng = np.random.default_rng(epoch_seed(ld.seed, self.epoch, 1 + 7919 * (1 + stream)))
        sizes = [min(B, ld.per_rank - b * B) for b in range(b0, b1)]
        decoded = (ld._decode(s, flip_rng) for s in ds)
        expected, got = real_hi - real_lo, 0
        short = DataError(f"{sd.root}: the {sd.split} shards hold fewer samples than the manifest "
                          f"says; run `python tools/shard.py --verify {sd.root}`")
        for bsize in sizes:
            batch = []
            while len(batch) < bsize and got < expected:
                item = next(decoded, None)
                if item is None:
                    raise short
                batch.append((item, True))
                got += 1
            if len(batch) < bsize:  # padding: the rank's last real sample, marked invalid
                for _ in decoded:  # read on through the rank's last sample (sets _pad_sample)
                    raise DataError(f"{sd.root}: more samples than expected in a shard; run "
                                    f"`python tools/shard.py --verify {sd.root}`")
                if self._pad_sample is None:
                    raise short
                pad_item = ld._decode(self._pad_sample, None)
                batch += [(pad_item, False)] * (bsize - len(batch))
            yield ld._collate(batch)


class WdsLoader(Loader):
    kind = "wds"

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)

    def _decode(self, sample: dict, flip_rng) -> dict:
        """Explicit handlers: JPEG through PIL (the reference transform), binary members through
        numpy. Members not asked for (json, lmk, ...) are never touched."""
        s = self.size
        key = sample.get("__key__")
        if self.member not in sample:
            raise DataError(f"{sample.get('__url__')}: sample {key} has no .{self.member}; "
                            "re-run tools/shard.py")
        if self.member == "jpg":
            try:
                with Image.open(io.BytesIO(sample["jpg"])) as im:
                    img = resize_crop_array(im, s, self.crop)
            except (OSError, ValueError) as e:
                raise DataError(f"{sample.get('__url__')}: {key}.jpg does not decode ({e}); "
                                f"run `python tools/shard.py --verify {self.sd.root}`") from None
        else:
            img = np.frombuffer(sample["rgb"], np.uint8).reshape(s, s, 3)
        if flip_rng is not None and self.flip and flip_rng.random() < 0.5:
            img = img[:, ::-1]
        out = {"image": img}
        for name, dtype in self.sd.labels:
            out[name] = np.frombuffer(sample[name], dtype=dtype)
        return out

    def _collate(self, batch: list[tuple[dict, bool]]) -> dict:
        # uint8 HWC crosses to the main process (4x less shared memory than float32: fresh
        # shared-memory pages are what a DataLoader batch costs most on a small VM)
        out = {"image": torch.from_numpy(np.stack([b["image"] for b, _ in batch]))}
        for name, _ in self.sd.labels:
            arr = np.stack([b[name] for b, _ in batch])
            out[name] = torch.from_numpy(arr.reshape(len(arr)) if arr.shape[1] == 1 else arr)
        out["valid"] = torch.tensor([v for _, v in batch])
        return out

    def _run_epoch(self, epoch: int):
        dl = torch.utils.data.DataLoader(
            _WdsEpoch(self, epoch), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        count = 0
        for batch in dl:
            if "__error__" in batch:
                raise DataError(batch["__error__"])
            batch["image"] = torch.from_numpy(_hwc_to_float(batch["image"].numpy()))
            count += 1
            yield _put(batch, self.device)
        if count != self.num_batches:
            raise DataError(f"{self._where()}: read {count} batches, expected {self.num_batches}; "
                            f"run `python tools/shard.py --verify {self.sd.root}`")


# ---------------------------------------------------------------------------------------------
# dali

class DaliLoader(Loader):
    """DALI pipeline (fastceleba.pipeline) + DALIGenericIterator.

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

        from .pipeline import build_pipeline

        sd, W = self.sd, self.world_size
        order = np.arange(len(sd.shards))
        shard_id = self.rank
        if self.shuffle:
            order = np.random.default_rng(epoch_seed(self.seed, epoch, 0)).permutation(len(sd.shards))
            shard_id = (self.rank + epoch) % W
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


# ---------------------------------------------------------------------------------------------

def make_loader(kind: str, data: str | os.PathLike, split: str, batch_size: int, *,
                device: str | torch.device | None = None, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                crop: int | None = None, flip: bool = False, size: int = 64, member: str = "auto",
                folder: str | os.PathLike | None = None, verify: bool = False,
                progress: bool | None = None) -> Loader:
    """A loader of ``split`` from the shard directory ``data``; see the module docstring.

    kind: one of KINDS. member: "jpg", "rgb" or "auto" (not for pil). folder: pil's image folder
    (default: the manifest's image_dir). verify: check every shard's sha256 first. progress:
    the cache's decode progress bar (None: only on a terminal). num_workers: DataLoader worker
    processes (pil, wds) or threads (turbo, cache build, DALI). Never pass the result through
    accelerator.prepare(): it is already sharded by rank.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if batch_size < 1 or size < 1 or (crop is not None and crop < 1) or num_workers < 0 or seed < 0:
        raise ValueError("batch_size, size and crop must be positive; num_workers and seed >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} asked for but CUDA is not available")
    sd = open_split(data, split, verify=verify)
    if sd.num_samples < world_size:
        raise DataError(f"{sd.root / MANIFEST}: split {split!r} has {sd.num_samples} samples, fewer than "
                        f"world_size={world_size} ranks; use fewer processes")
    common = dict(batch_size=batch_size, device=dev, shuffle=shuffle, seed=seed, drop_last=drop_last,
                  rank=rank, world_size=world_size, num_workers=num_workers, crop=crop, flip=flip,
                  size=size)
    if kind == "pil":
        return PilLoader(sd, folder, member="folder", **common)
    member = choose_member(sd, member, size, crop)
    if kind == "dali":
        return DaliLoader(sd, member=member, **common)
    if kind == "wds":
        return WdsLoader(sd, member=member, **common)
    if kind == "turbo":
        return TurboLoader(sd, member=member, **common)
    return CacheLoader(sd, progress=progress, member=member, **common)
