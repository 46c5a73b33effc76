#!/usr/bin/env python
"""Turn a CelebA folder into WebDataset shards that DALI and the webdataset library both read.

    python tools/shard.py ~/data/celeba shards/           # JPEG shards, official splits
    python tools/shard.py ~/data/celeba shards64/ --size 64 --no-jpeg   # raw 64x64, fastest to load
    python tools/shard.py --verify shards/                # re-read everything, check checksums

SRC is the CelebA root (official layout, or Kaggle's: CSV annotations and the nested
img_align_celeba/img_align_celeba/) or the image folder itself; the tool prints which annotation
files it found and uses. Image names must be CelebA's NNNNNN.jpg (the number is the sample's num).

Exit status: 0 done (or verified clean), 1 verification found problems, 2 bad input (one line
`error: FILE: what is wrong; the fix`). Re-running an interrupted command with the same arguments
resumes: finished shards are kept. If the annotations, the image list or the options changed
since, the unfinished run starts over (and says so).
"""

import argparse
import sys
import time
from pathlib import Path

try:
    import fastceleba  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastceleba.cli import byte_size, fractions
from fastceleba.errors import DataError
from fastceleba.shards import RAW_MEMBER, verify
from fastceleba.shardwriter import ShardOptions, os_error_line, write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SRC OUT",
                   help="the CelebA root (holding img_align_celeba/ and the annotation .txt or Kaggle .csv "
                        "files, or the image folder itself) and the output directory, which must not "
                        "be inside SRC; with --verify, only the shard directory")
    p.add_argument("--verify", action="store_true",
                   help="re-read every shard of OUT: counts, sha256 of every tar and DALI index against "
                        "the manifest, and that every image decodes")
    p.add_argument("--size", type=int, default=None,
                   help="also store each image resized (shorter side) and centre-cropped to SIZE x SIZE "
                        f"as raw uint8 RGB, the loaders' own transform (member .{RAW_MEMBER})")
    p.add_argument("--crop", type=int, default=None,
                   help="with --size: first crop the centre CROP x CROP pixels (148 is the usual CelebA face crop)")
    p.add_argument("--no-jpeg", dest="jpeg", action="store_false",
                   help="with --size: leave out the original JPEG bytes (smaller shards, raw images only)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--shard-bytes", type=byte_size, default=None,
                   help="cut shards by size instead, e.g. 500M (overrides --shard-size)")
    p.add_argument("--split", type=fractions, default=(0.8, 0.1, 0.1),
                   help="train,valid,test fractions for a seeded random split, used only when "
                        "list_eval_partition.txt/.csv is absent (default 0.8,0.1,0.1; the notebook's was 0.8,0,0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split and of the in-split shuffle")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable images (corrupt, truncated, too large for PIL, or failing the "
                        "--size resize) instead of stopping; each is printed and listed in the manifest")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)

    try:
        if args.verify:
            if len(args.paths) != 1:
                p.error("--verify takes one shard directory")
            problems = verify(Path(args.paths[0]), progress=args.progress)
            for line in problems:
                print(line)
            print(f"{args.paths[0]}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        if len(args.paths) != 2:
            p.error("give SRC and OUT (or --verify OUT)")
        opts = ShardOptions(size=args.size, crop=args.crop, jpeg=args.jpeg, shard_size=args.shard_size,
                            shard_bytes=args.shard_bytes, split=args.split, seed=args.seed,
                            skip_bad=args.skip_bad)
        start = time.perf_counter()
        manifest = write_shards(Path(args.paths[0]), Path(args.paths[1]), opts,
                                workers=args.workers, progress=args.progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. reading a shard directory we may not open
        print(f"error: {os_error_line(e, Path(args.paths[-1]))}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    counts = ", ".join(f"{k} {v['num_samples']} ({len(v['shards'])} shards)" for k, v in manifest["splits"].items())
    print(f"{args.paths[1]}: {counts}; {total / seconds:.0f} images/s")
    for bad in manifest["skipped"]:
        print(f"skipped {bad['file']}: {bad['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
