"""``turbo``: JPEGs read straight from the tars and decoded by libjpeg-turbo in GIL-free threads.

* ``SampleReader``: simplejpeg decodes each JPEG at the smallest power-of-two DCT scale that
  still covers ``size`` (178x218 -> 89x109 for size 64); torch's uint8 antialiased bilinear
  resize (PIL's filter) finishes a chunk of images at once. The cache loader builds on it too.
* ``serial_torch_thread``: the one workaround for running torch ops in a thread pool (below).
* ``TurboLoader``: the epoch plan's batches, decoded by ``num_workers`` threads, a few in flight.

Orders, rank slices and padding come from the plan (plan.py), never from here.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from ..transforms import check_geometry, crop_box, resized_shape
from .base import Loader, host_images, hwc_to_float, u8_batch_to_device
from .plan import split_batches
from .split import SplitData, TarMembers


def dct_scale(h: int, w: int, size: int, crop: int | None) -> tuple[int, int, int]:
    """The DCT scale factor a ``h x w`` JPEG decodes at, and the decoded (height, width).

    1/2 when the crop window's shorter side still covers ``size`` there (178x218 -> 89x109 for
    size 64), else 1. Only 1/2: the 1/4 and 1/8 scales' 2x2 and 1x1 IDCTs are too crude
    (measured: 2.2-5.1/255 from the reference at size 32, against 0.3-1.8/255 at 1/2), and the
    3/8 scale decodes no faster than 1/2 on CelebA-like JPEGs (~11k img/s per core each) while
    leaving the resize almost nothing to filter. Decoded pixel j covers full-size pixels
    [j*f, (j+1)*f), the last one possibly cut short."""
    short = min(h, w, crop) if crop else min(h, w)
    f = 2 if short // 2 >= size else 1
    return f, math.ceil(h / f), math.ceil(w / f)


def decode_scaled(data, size: int, crop: int | None) -> tuple[np.ndarray, tuple[int, int], int]:
    """One JPEG decoded by libjpeg-turbo at ``dct_scale``: the decoded image, the full-size (h, w)
    and the scale factor."""
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    f, dh, dw = dct_scale(h, w, size, crop)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=dh, min_width=dw), (h, w), f


def _finish_one(arr: np.ndarray, full_hw: tuple[int, int], factor: int, size: int,
                crop: int | None) -> np.ndarray:
    """One decoded (possibly DCT-scaled) image -> the reference geometry with PIL: ``crop`` centre
    crop, shorter side to ``size``, centre crop; computed in one resize of the float window
    ``transforms.crop_box``, in the decoded image's pixels (1/factor of the full image's)."""
    h, w = full_hw
    box = tuple(v / factor for v in crop_box(h, w, size, crop))
    return np.array(Image.fromarray(arr).resize((size, size), Image.BILINEAR, box=box))


class SampleReader:
    """Reads samples straight from the tars and decodes them (thread-safe).

    Meant for a pool of threads: os.preadv, simplejpeg's decode and torch's resize release the
    GIL, so ``num_workers`` threads keep ``num_workers`` cores busy. Per image on one core (178x218
    synthetic faces, dev VM): read 2 us, header 2 us, 1/2-scale decode ~120 us, resize ~17 us."""

    def __init__(self, sd: SplitData, member: str, size: int, crop: int | None):
        self.sd, self.member, self.size, self.crop = sd, member, size, crop
        self.ext = sd.ext(member)
        self.tar = TarMembers(sd, [self.ext] + [name for name, _ in sd.labels])
        self._labels = self.tar.labels()
        self._local = threading.local()  # each thread's read arena (TarMembers.read_many)

    def _read(self, idx: np.ndarray) -> list[np.ndarray]:
        arena, views = self.tar.read_many(idx, self.ext, getattr(self._local, "arena", None))
        self._local.arena = arena
        return views

    def _bad_jpeg(self, i: int, e: Exception) -> DataError:
        return DataError(f"{self.tar.where(i)}: JPEG does not decode ({e}); run "
                         f"`python tools/shard.py --verify {self.sd.root}`")

    def images(self, idx: np.ndarray) -> np.ndarray:
        """k x size x size x 3 uint8 (HWC) images of the samples idx."""
        s, crop = self.size, self.crop
        out = np.empty((len(idx), s, s, 3), np.uint8)
        if self.member == "rgb":
            flat = out.reshape(len(idx), -1)
            for j, i in enumerate(idx):
                self.tar.read_into(i, self.ext, flat[j])
            return out
        jpegs = self._read(idx)
        groups: dict[tuple, list[int]] = {}  # (h, w) -> positions in idx; CelebA's aligned set: one
        for j, data in enumerate(jpegs):
            try:
                h, w = simplejpeg.decode_jpeg_header(data)[:2]
            except ValueError as e:
                raise self._bad_jpeg(idx[j], e) from None
            if crop is not None:  # (the file name is formatted only here: ~1 us an image)
                check_geometry(h, w, s, crop, self.tar.where(idx[j]))
            groups.setdefault((h, w), []).append(j)
        for (h, w), js in groups.items():
            f, dh, dw = dct_scale(h, w, s, crop)
            decoded = np.empty((len(js), dh, dw, 3), np.uint8)  # decoded in place: no copies to stack
            for k, j in enumerate(js):
                try:
                    simplejpeg.decode_jpeg(jpegs[j], colorspace="RGB", min_height=dh, min_width=dw,
                                           buffer=decoded[k])
                except ValueError as e:
                    raise self._bad_jpeg(idx[j], e) from None
            if crop is None and dh * f == h and dw * f == w:
                # The scaled image covers the full one exactly (even sides): resize it whole to the
                # reference's resized shape (the same pixel grid as resizing the full image), then
                # take the centre: torch's uint8 antialiased bilinear resize (PIL's filter) for the
                # whole group in one call.
                rh, rw = resized_shape(h, w, s)
                x = torch.from_numpy(decoded).permute(0, 3, 1, 2)
                y = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
                top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
                out[js] = y[:, :, top:top + s, left:left + s].permute(0, 2, 3, 1).numpy()
            else:  # a crop, or an odd side whose last scaled pixel is cut short: PIL's float box
                for k, j in enumerate(js):
                    out[j] = _finish_one(decoded[k], (h, w), f, s, crop)
        return out

    def labels(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Each label member of the samples idx: (k,) or (k, width) arrays."""
        return {name: arr[idx] for name, arr in self._labels.items()}

    def close(self) -> None:
        self.tar.close()


@functools.cache
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


class TurboLoader(Loader):
    kind = "turbo"
    threaded = True
    prefetch = 2  # batches in flight beyond the one being handed out

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)
        self.reader = SampleReader(sd, self.member, self.size, self.crop)
        self.threads = max(1, self.num_workers)
        self._pool: ThreadPoolExecutor | None = None  # kept across epochs: starting one costs ~10 ms

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _fill(self, idx: np.ndarray, flips: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
        """Thread part: decode samples idx into out: k x size x size x 3 uint8 for a GPU, else
        k x 3 x size x size float32 in [0, 1]."""
        images = self.reader.images(idx)
        view = torch.from_numpy(images)
        for j in np.flatnonzero(flips).tolist():  # one image at a time: 3x faster than numpy's fancy ::-1
            view[j] = view[j].flip(1)
        if self.u8_transfer:
            out[...] = images
        else:
            hwc_to_float(images, out)
        return self.reader.labels(idx)

    def _submit(self, pool: ThreadPoolExecutor, idx: np.ndarray, valid: np.ndarray,
                flips: np.ndarray) -> tuple:
        if self.u8_transfer:
            out = host_images(len(idx), self.size, self.device)
        else:
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
        return u8_batch_to_device(batch, self.device) if self.u8_transfer else batch

    def _run_epoch(self, epoch: int, start: int):
        idx, valid = self._plan(epoch, start)
        flips = self._flips(epoch)[idx]
        slices = split_batches(len(idx), self.batch_size)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="turbo",
                                            initializer=serial_torch_thread)
        pending: deque = deque()
        try:
            for k in range(len(slices)):
                while len(pending) <= self.prefetch and k + len(pending) < len(slices):
                    s = slices[k + len(pending)]
                    pending.append(self._submit(self._pool, idx[s], valid[s], flips[s]))
                yield self._assemble(pending.popleft())
        finally:  # an epoch left early: drop its queued work, let running chunks finish
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()


