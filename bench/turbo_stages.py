#!/usr/bin/env python
"""Where one turbo loader thread spends its time per image, stage by stage.

    python bench/turbo_stages.py                 # bench/loader.py's synthetic 178x218 JPEG shards
    python bench/turbo_stages.py --data shards/ --chunk 64

One pool thread on one core (torch's intra-op threads set to 1 there, as in turbo's pool), chunks of --chunk images
(a thread's share of a batch: 64 for batch 128 on 2 threads). Each stage of SampleReader.images is
timed alone on the same chunk: read (os.preadv into the reused arena), header parse, reduced-scale
decode (libjpeg-turbo through simplejpeg, into one preallocated array), the batched uint8 antialiased
resize, the centre-crop copy, and the float conversion the CPU path does in TurboLoader._fill; then
SampleReader.images() whole, whose excess over its stages is Python glue and allocation. Medians over --repeats
chunks (each stage on every chunk's own data, the stages of a chunk one after another), in
microseconds per image. bench/loader.py's "limits" decode is the decode row on all cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastceleba.errors import DataError  # noqa: E402
from fastceleba.loaders.base import hwc_to_float  # noqa: E402
from fastceleba.loaders.split import open_split  # noqa: E402
from fastceleba.loaders.turbo import SampleReader, dct_scale, serial_torch_thread  # noqa: E402
from fastceleba.transforms import resized_shape  # noqa: E402
# a sibling bench script (running one puts bench/ first on sys.path)
import loader as loader_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="JPEG shard directory (default: bench/loader.py's synthetic shards)")
    p.add_argument("--chunk", type=int, default=64, help="images a thread decodes at once (default 64)")
    p.add_argument("--repeats", type=int, default=40, help="chunks timed per stage (default 40)")
    p.add_argument("--size", type=int, default=64, help="output side (default 64)")
    args = p.parse_args(argv)
    if min(args.chunk, args.repeats, args.size) < 1:
        p.error("--chunk, --repeats and --size must be >= 1")
    try:
        data = args.data or loader_bench.prepare_data(ROOT / "data" / "bench", 5000)[0]
        sd = open_split(data, "train")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sd.num_samples < args.chunk:
        p.error(f"--chunk {args.chunk}: the train split has only {sd.num_samples} images")
    reader = SampleReader(sd, "jpg", args.size, None)
    k, s = args.chunk, args.size
    starts = [(r * k) % (sd.num_samples - k + 1) for r in range(args.repeats)]

    # each chunk's inputs to every stage, made before timing (CelebA's aligned images share one size)
    jpegs = [[bytes(v) for v in reader._read(np.arange(a, a + k))] for a in starts]
    h, w = simplejpeg.decode_jpeg_header(jpegs[0][0])[:2]
    _, dh, dw = dct_scale(h, w, s, None)
    decoded = np.empty((len(starts), k, dh, dw, 3), np.uint8)
    rh, rw = resized_shape(h, w, s)
    top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
    images = np.empty((len(starts), k, s, s, 3), np.uint8)
    floats = np.empty((k, 3, s, s), np.float32)
    for buf in (decoded, images, floats):  # touched once now, so no stage pays the first page faults
        buf.fill(0)

    def decode(r, idx):
        for j, data in enumerate(jpegs[r]):
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=dh, min_width=dw, buffer=decoded[r, j])

    def resize(r, idx):
        x = torch.from_numpy(decoded[r]).permute(0, 3, 1, 2)
        return F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)

    def crop_copy(r, idx):
        images[r] = resize_out[r][:, :, top:top + s, left:left + s].permute(0, 2, 3, 1).numpy()

    resize_out: list[torch.Tensor] = []
    stages = {
        "read": lambda r, idx: reader._read(idx),
        "header": lambda r, idx: [simplejpeg.decode_jpeg_header(d) for d in jpegs[r]],
        "decode (reduced scale)": decode,
        "resize (uint8, batched)": lambda r, idx: resize_out.append(resize(r, idx)),
        "crop copy": crop_copy,
        "float conversion": lambda r, idx: hwc_to_float(images[r], floats),
    }
    stages["SampleReader.images()"] = lambda r, idx: reader.images(idx)
    times: dict[str, list[float]] = {name: [] for name in stages}

    def run() -> None:
        for r, a in enumerate(starts):  # chunk by chunk, every stage in turn: a slow minute hits them alike
            idx = np.arange(a, a + k)
            for name, stage in stages.items():
                t = time.perf_counter()
                stage(r, idx)
                times[name].append(time.perf_counter() - t)

    # in a pool thread, as turbo decodes: in the main thread every fresh chunk-sized array is a new
    # mmap whose pages fault on first touch (~20 us an image more), which turbo's threads do not pay
    with ThreadPoolExecutor(1, initializer=serial_torch_thread) as pool:
        pool.submit(run).result()
    results = {name: 1e6 * statistics.median(v[3:] or v) / k for name, v in times.items()}
    whole = results.pop("SampleReader.images()")
    reader.close()
    m = loader_bench.machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU: none (one CPU thread), torch {m['torch']}; {data}: "
          f"{h}x{w} JPEGs decoded at {dh}x{dw}, chunks of {k}, medians of {args.repeats}")
    for name, us in results.items():
        print(f"{name:26} {us:7.1f} us/image")
    staged = sum(v for n, v in results.items() if n != "float conversion")
    print(f"{'SampleReader.images()':26} {whole:7.1f} us/image (its stages {staged:.1f}: "
          f"Python glue and allocation ~{whole - staged:.1f})")
    print(f"{'with float conversion':26} {whole + results['float conversion']:7.1f} us/image, "
          f"{1e6 / (whole + results['float conversion']):.0f} images/s on this core; the decode alone "
          f"{1e6 / results['decode (reduced scale)']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
