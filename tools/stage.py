#!/usr/bin/env python
"""Copy shards from a URL, an object store (through a pipe: command) or another directory to local disk.

    python tools/stage.py https://example.org/celeba/shards/ /local/shards
    python tools/stage.py 'pipe:aws s3 cp s3://bucket/shards/{name} -' /local/shards --split train,valid
    python tools/stage.py /nfs/shards /local/shards --split test

SRC is what `--data` accepts: a shard directory, an http(s) URL of one, or a webdataset pipe:
command in which {name} stands for each file name (manifest.json, the keys files, the tars and
their .idx). Every tar's size and sha256 are checked against the manifest and every .idx against
its tar; each file appears under its name only when complete and correct. The manifest is written
last and lists the splits staged so far, so DEST is an ordinary shard directory that every loader
(dali, turbo, cache, wds, pil) reads and `tools/shard.py --verify DEST` checks. An interrupted or
failed run re-run with the same arguments resumes: correct files are kept, partial ones removed.

Exit status: 0 done, 2 bad input or a failed transfer (one line `error: SRC: what; the fix`).
"""

import argparse
import sys
import time
from pathlib import Path

try:
    import fastceleba  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastceleba.errors import DataError
from fastceleba.remote import stage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC",
                   help="where the shards are: a shard directory, an http(s):// URL of one, or "
                        "'pipe:COMMAND' with {name} where each file name goes (quote it for the shell)")
    p.add_argument("dest", metavar="DEST", type=Path,
                   help="local directory to copy into (created if needed; re-use it to resume or to add splits)")
    p.add_argument("--split", default=None, metavar="SPLITS",
                   help="comma-separated splits to copy, e.g. train,valid (default: every split in the manifest)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    splits = [s for s in args.split.split(",") if s] if args.split else None
    if args.split is not None and not splits:
        p.error("--split needs at least one split name, e.g. --split train")
    start = time.perf_counter()
    try:
        manifest = stage(args.src, args.dest, splits, progress=args.progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: re-run the same command to resume into {args.dest}", file=sys.stderr)
        return 130
    counts = ", ".join(f"{k} {v['num_samples']} ({len(v['shards'])} shards)" for k, v in manifest["splits"].items())
    print(f"{args.dest}: {counts}; {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
