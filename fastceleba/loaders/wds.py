"""``wds``: the ``webdataset`` library in DataLoader worker processes.

Explicit decoders only: libjpeg-turbo (simplejpeg, strict) + PIL's resize for JPEG (the
reference transform), numpy for the binary members;
never webdataset's default decoders, which can unpickle. Workers take whole batches of the
rank's slice of the epoch plan (``plan.rank_slice``), so any number of shards, ranks and workers reads
each sample once. Streaming: the order within an epoch is a permuted tar order plus a shuffle buffer.
"""

from __future__ import annotations

import random
import re
import tarfile

import numpy as np
import simplejpeg
import torch
from PIL import Image

from ..errors import DataError
from ..remote import RemoteDir
from ..transforms import check_geometry, resize_crop_array
from .base import Loader, hwc_to_float, own_generator, u8_batch_to_device
from .plan import epoch_order, epoch_seed, rank_slice
from .split import SplitData


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
            sd = self.loader.sd
            urls = {str(tar) for tar, _ in sd.shards}  # webdataset appends the url to e.args
            where = next((a for a in e.args if isinstance(a, str) and (a in urls or a.endswith(".tar"))), None)
            if isinstance(sd.root, RemoteDir):
                yield {"__error__": f"{where or sd.root}: streaming failed ({_stream_failure(e, where)}); "
                                    f"{_fix(sd)}"}
            else:
                yield {"__error__": f"{where or self.loader.sd.root}: unreadable shard ({e.args[0]}); "
                                    f"run `python tools/shard.py --verify {self.loader.sd.root}`"}

    def _batches(self):
        import webdataset as wds

        ld, sd = self.loader, self.loader.sd
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the epoch's stream: shards (maybe permuted), with each shard's first stream position
        shard_order = epoch_order(len(sd.shards), ld.shuffle, ld.seed, self.epoch)
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

        def holds(url, ranges):  # does the tar hold stream positions in ranges?
            s, n = starts[url], shard_len[url]
            return any(a < s + n and s < b for a, b in ranges)

        def overlapping(ranges):  # a url splitter keeping the tars that hold positions in ranges
            def keep(src):
                for item in src:
                    if holds(item["url"], ranges):
                        yield item
            return keep

        stop = max(real_hi, hi if pad else 0)  # nothing this worker needs lies beyond
        kept = [u for u in urls if holds(u, [(lo, hi)]) and holds(u, want)]  # what the splitters keep

        def cut_short(url, got):  # a shard that streamed fewer samples than the manifest says
            return DataError(f"{url}: streamed {got} samples but the manifest says {shard_len[url]} "
                             f"(the connection dropped or the shard is truncated); {_fix(sd)}")

        def take(src):  # the worker's samples, by stream position; every shard counted in full
            url, i, opened = None, 0, 0
            for sample in src:
                if sample["__url__"] != url:
                    if url is not None and i != shard_len[url]:
                        raise cut_short(url, i)
                    url, i = sample["__url__"], 0
                    if opened >= len(kept) or url != kept[opened]:
                        raise cut_short(kept[min(opened, len(kept) - 1)], 0)
                    opened += 1
                if i >= shard_len[url]:
                    raise DataError(f"{url}: more samples than the manifest's {shard_len[url]}; {_fix(sd)}")
                g = starts[url] + i
                i += 1
                if pad and g == hi - 1:
                    self._pad_sample = sample
                if real_lo <= g < real_hi:
                    yield sample
                if g + 1 >= stop:
                    return  # stop reading: the rest of the tar belongs to other workers
            # the stream ended before the last sample this worker needs: a shard came short
            if url is not None and i != shard_len[url]:
                raise cut_short(url, i)
            raise cut_short(kept[min(opened, len(kept) - 1)], 0)

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


def _fix(sd: SplitData) -> str:
    if isinstance(sd.root, RemoteDir):
        return (f"check the source, or stage the shards with `python tools/stage.py {sd.root.quoted()} DIR` "
                "(it checks every sha256) and read DIR")
    return f"run `python tools/shard.py --verify {sd.root}`"


_CURL = {6: "cannot resolve the host", 7: "cannot connect", 18: "the connection closed before the end",
         22: "an HTTP error such as 404", 28: "timed out", 56: "the connection was reset"}


def _stream_failure(e: Exception, url: str | None) -> str:
    """What went wrong, in words. webdataset reports a failed curl or pipe as 'ARGS: exit N', or,
    when tarfile sees the end of the stream first, as a ReadError with the Pipe in e.args."""
    first = str(e.args[0]) if e.args else str(e)
    m = re.search(r": exit (\d+) \(read\)", first)
    status = int(m.group(1)) if m else None
    pipe = next((a for a in e.args if hasattr(a, "proc") and hasattr(a.proc, "wait")), None)
    if status is None and pipe is not None:
        try:
            status = pipe.proc.wait(timeout=5) or None  # curl exits right after a dropped connection
        except Exception:
            status = None
    reason = f"{type(e).__name__}: {first.split(' @ <')[0][:200]}"
    if status is not None and url and url.startswith("pipe:"):
        return f"the command exited with status {status}; {reason}" if not m else \
            f"the command exited with status {status}"
    if status is not None:
        return f"curl exit {status}: {_CURL.get(status, 'see man curl')}"
    if isinstance(e, FileNotFoundError) and url and url.startswith("http"):
        return "webdataset streams http(s) with curl, which is not installed"
    return reason


class WdsLoader(Loader):
    kind = "wds"

    def __init__(self, sd: SplitData, **kw):
        super().__init__(sd, sd.num_samples, **kw)

    def _decode(self, sample: dict, flip_rng) -> dict:
        """Explicit handlers: JPEG through simplejpeg + PIL (the reference transform), binary members through
        numpy. Members not asked for (json, lmk, ...) are never touched."""
        s = self.size
        key = sample.get("__key__")
        ext = self.sd.ext(self.member)
        if ext not in sample:
            raise DataError(f"{sample.get('__url__')}: sample {key} has no .{ext}; "
                            "re-run tools/shard.py")
        if self.member == "jpg":
            try:
                # libjpeg-turbo through simplejpeg: PIL's very pixels, but strict where PIL
                # decodes corrupt entropy data to grey without a word
                arr = simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB")
                check_geometry(arr.shape[0], arr.shape[1], s, self.crop, f"{sample.get('__url__')} ({key}.jpg)")
                img = resize_crop_array(Image.fromarray(arr), s, self.crop)
            except (OSError, ValueError) as e:
                raise DataError(f"{sample.get('__url__')}: {key}.jpg does not decode ({e}); "
                                f"run `python tools/shard.py --verify {self.sd.root}`") from None
        else:
            img = np.frombuffer(sample[ext], np.uint8).reshape(s, s, 3)
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

    def _run_epoch(self, epoch: int, start: int):
        dl = torch.utils.data.DataLoader(
            _WdsEpoch(self, epoch), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=own_generator(self.seed, epoch),
        )
        count = 0
        for batch in dl:
            if "__error__" in batch:
                raise DataError(batch["__error__"])
            count += 1
            if count <= start:  # a stream cannot seek: a run resumed mid-epoch reads past what it had
                continue
            if self.u8_transfer:  # uint8, already pinned by the DataLoader, converted on the device
                yield u8_batch_to_device(batch, self.device)
            else:
                batch["image"] = torch.from_numpy(hwc_to_float(batch["image"].numpy()))
                yield batch
        if count != self.num_batches:
            raise DataError(f"{self._where()}: read {count} batches, expected {self.num_batches}; "
                            f"run `python tools/shard.py --verify {self.sd.root}`")


