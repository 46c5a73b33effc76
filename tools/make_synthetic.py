#!/usr/bin/env python
"""Write a synthetic CelebA (face-like JPEGs + the official annotation files) for tests and demos.

    python tools/make_synthetic.py /tmp/celeba                  # 2000 images, seed 0
    python tools/make_synthetic.py /tmp/celeba --num 20000 --seed 1 --split 0.9,0.05,0.05

ROOT gets img_align_celeba/000001.jpg ..., list_eval_partition.txt, list_attr_celeba.txt,
identity_CelebA.txt and list_landmarks_align_celeba.txt in the official layout. The same
--num and --seed give byte-identical files whatever --workers.
Exit status: 0 done, 2 bad input (e.g. ROOT already holds images and --overwrite is not given).
"""

import argparse
import sys
import time
from pathlib import Path

try:
    import fastceleba  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastceleba.cli import fractions
from fastceleba.errors import DataError
from fastceleba.synth import IMAGE_DIR, generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="directory to write the synthetic CelebA into (created if missing)")
    p.add_argument("--num", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same --seed and --num give identical files (default 0)")
    p.add_argument("--split", type=fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VALID,TEST",
                   help="fractions of the contiguous train/valid/test blocks in list_eval_partition.txt "
                        "(default 0.8,0.1,0.1)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that draw and encode images (default: all CPU cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="write even if ROOT/img_align_celeba already holds files (numbered images are replaced)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        root = generate(args.root, args.num, args.seed, partition=args.split, workers=args.workers,
                        progress=args.progress, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    image_bytes = sum(f.stat().st_size for f in (root / IMAGE_DIR).glob("*.jpg"))
    print(f"wrote {args.num} images ({image_bytes / args.num / 1024:.1f} KB each on average) to "
          f"{root / IMAGE_DIR} and 4 annotation files to {root}")
    print(f"{seconds:.1f} s, {args.num / seconds:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
