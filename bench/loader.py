#!/usr/bin/env python
"""How fast does each loader deliver 64x64 CelebA batches? One command, one table.

    python bench/loader.py                       # synthetic CelebA, made and sharded on first use
    python bench/loader.py --data shards/ --raw shards64/ --json out.json --png out.png

With no --data, a synthetic CelebA (fastceleba.synth, --synthetic images) is generated under
--cache-dir (default ./data/bench) and sharded twice: JPEG shards (jpg-N/) and raw 64x64 shards
without JPEGs (rgb64-N/, ``tools/shard.py --size 64 --no-jpeg``). Later runs reuse them.

Every loader runs in its own fresh process (so peak memory is its own): make the loader, run
--warmup passes, then --repeats timed passes over the same --images images (shuffle on, as in
training; DALI's per-epoch pipeline rebuild and DataLoader worker start-up are included). All
loaders get the same --workers processes or threads; the table and the JSON say how many each
really runs (threads for turbo, cache and dali, at least one; processes for pil and wds). The
table gives images/s (median, min, max), the ratio of medians to pil, the peak RSS of the
loader's process tree (summed over the main process and its workers, sampled every 0.1 s: an
upper bound, shared pages count per process), and "others": how many cores other processes kept
busy during the run (machine busy time from /proc/stat minus the loader's own CPU time).
--wait-idle waits, before each loader, until the cores are idle: on a shared machine other load
decides the numbers. A "limits" section measures what one core can do with the same JPEGs: libjpeg-turbo (simplejpeg) decode
at full and at the reduced scale the turbo loader uses, and PIL decode + resize (pil's
per-image work); and the reduced-scale decode on all cores at once. "share_of_limit" gives turbo:jpg
against cores x the per-core reduced decode, and against that all-cores figure, also timed between
turbo's own passes (the median of paired ratios, so a machine that slows down mid-run does not count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastceleba.errors import DataError  # noqa: E402
from fastceleba.files import atomic_path, atomic_write  # noqa: E402

ALL = ["pil", "dali:jpg", "wds:jpg", "turbo:jpg", "cache:jpg", "dali:rgb", "wds:rgb", "turbo:rgb", "cache:rgb"]


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_avg_at_start": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------
# Data

def prepare_data(cache_dir: Path, num: int) -> tuple[Path, Path]:
    """Synthetic CelebA + JPEG shards + raw 64x64 shards under cache_dir (made once)."""
    from fastceleba.shardwriter import ShardOptions, write_shards
    from fastceleba.synth import generate

    src, jpg, rgb = cache_dir / f"celeba-{num}", cache_dir / f"jpg-{num}", cache_dir / f"rgb64-{num}"
    if not (src / "list_eval_partition.txt").is_file():
        print(f"generating a synthetic CelebA of {num} images in {src} (once)", file=sys.stderr)
        generate(src, num, seed=0, overwrite=True)
    for out, opts in ((jpg, ShardOptions(shard_size=1000)),
                      (rgb, ShardOptions(size=64, jpeg=False, shard_size=1000))):
        if not (out / "manifest.json").is_file():
            print(f"sharding into {out} (once)", file=sys.stderr)
            write_shards(src, out, opts)
    return jpg, rgb


# ---------------------------------------------------------------------------------------------
# One loader, in its own process

class PeakRSS:
    """Peak of the summed RSS of this process and its children, sampled in a thread every 0.1 s.

    RSS, not PSS: reading PSS costs ~2.5 ms per process and would itself load the cores. Pages a
    forked worker shares with its parent count once per process, so this is an upper bound."""

    def __init__(self, interval: float = 0.1):
        try:
            import psutil
        except ImportError:  # no psutil: fall back to the kernel's peak RSS of each process
            psutil = None
        self.proc = psutil.Process() if psutil else None
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        if self.proc is None:
            import resource

            kib = sum(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
            return kib * 1024
        import psutil

        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def sample_jpegs(data: Path | str, split: str, n: int) -> list[bytes]:
    """The first n JPEGs of the split, read from the tars."""
    from fastceleba.loaders import open_split
    from fastceleba.loaders.split import TarMembers

    tm = TarMembers(open_split(data, split), ["jpg"])
    try:
        return [tm.read(i, "jpg") for i in range(min(n, tm.sd.num_samples))]
    finally:
        tm.close()


class AllCoresDecode:
    """The reduced-scale decode turbo uses, of the same JPEGs, in one thread per core at once
    (simplejpeg releases the GIL): what the cores together give right now. On a VM whose cores
    share physical ones, or beside other load, that is less than cores x one core's rate."""

    def __init__(self, blobs: list[bytes], cores: int, size: int = 64):
        from concurrent.futures import ThreadPoolExecutor

        self.chunks = [blobs[a:a + 64] for a in range(0, len(blobs), 64)]
        self.n, self.size = len(blobs), size
        self.pool = ThreadPoolExecutor(cores)

    def _decode(self, chunk: list[bytes]) -> None:
        from fastceleba.loaders.turbo import decode_scaled

        for b in chunk:
            decode_scaled(b, self.size, None)

    def rate(self) -> float:
        t0 = time.perf_counter()
        list(self.pool.map(self._decode, self.chunks))
        return self.n / (time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown()


def run_one(spec: dict) -> dict:
    import torch

    from fastceleba.loaders import make_loader
    from fastceleba.loaders.base import cores_per_local_rank

    kind, member = spec["kind"], spec["member"]
    device = torch.device(spec["device"])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        loader = make_loader(kind, spec["data"], spec["split"], spec["batch_size"], device=device,
                             shuffle=True, seed=0, num_workers=spec["workers"], member=member,
                             folder=spec.get("folder"), progress=False)
        setup_s = time.perf_counter() - t0
        target = min(spec["images"], loader.num_samples)

        def one_pass() -> float:
            seen, start = 0, time.perf_counter()
            while seen < target:  # whole epochs until `target` images (one epoch if it covers them)
                for batch in loader:
                    seen += batch["image"].shape[0]
                    if seen >= target:
                        break
            if device.type == "cuda":
                torch.cuda.synchronize()
            return seen / (time.perf_counter() - start)

        # turbo:jpg times its limit between its own passes (same JPEGs, same moments of the machine's
        # load): its share of the limit is then the median of paired ratios, not two runs minutes apart
        limit = (AllCoresDecode(sample_jpegs(spec["data"], spec["split"], 2000), cores_per_local_rank())
                 if kind == "turbo" and loader.member == "jpg" else None)
        for _ in range(spec["warmup"]):
            one_pass()
        rates, limit_rates = [], []
        for _ in range(spec["repeats"]):
            rates.append(one_pass())
            if limit is not None:
                limit_rates.append(limit.rate())
        if limit is not None:
            limit.close()
    return {"loader": spec["name"], "kind": kind, "data": loader.member if kind != "pil" else "jpg-folder",
            "device": str(device), "images": target, "setup_s": setup_s,
            # what the loader really runs (DALI on a GPU used to take every core whatever --workers said)
            "workers": loader.workers, "workers_are": loader.workers_are, "workers_asked": spec["workers"],
            "rates": rates, "median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "peak_rss_mb": mem.peak / 2**20,
            **({"all_cores_decode_rates": limit_rates,
                "share_of_all_cores_decode": statistics.median(r / x for r, x in zip(rates, limit_rates))}
               if limit_rates else {})}


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat; 0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine's cores are idle: less than `threshold` cores
    busy over 3 s, from /proc/stat, so load from other containers counts too. Returns the
    busy cores measured last."""
    deadline = time.time() + max_wait
    while True:
        b0 = busy_seconds()
        time.sleep(3)
        busy = (busy_seconds() - b0) / 3
        if busy < threshold or time.time() > deadline:
            return busy


def run_in_subprocess(spec: dict) -> dict:
    """Run one loader in a fresh process; also measure how many cores OTHER processes kept busy
    meanwhile (machine busy time minus the loader's own), which says if the numbers are clean."""
    import resource

    own0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds(), time.time()
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                          capture_output=True, text=True)
    own1, busy1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds(), time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"loader": spec["name"], "error": tail}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    own = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    result["other_load_cores"] = max(0.0, (busy1 - busy0 - own) / wall) if busy1 else float("nan")
    return result


# ---------------------------------------------------------------------------------------------
# Per-core limits on the same JPEGs

def limits(data: Path, split: str, images: int, size: int = 64) -> dict:
    """Single-thread images/s per core: simplejpeg full and reduced scale, PIL decode+resize."""
    import io

    import simplejpeg
    from PIL import Image

    from fastceleba.loaders import open_split
    from fastceleba.loaders.base import cores_per_local_rank
    from fastceleba.loaders.turbo import decode_scaled
    from fastceleba.transforms import resize_crop

    if "jpg" not in open_split(data, split).members:
        return {}
    blobs = sample_jpegs(data, split, min(images, 2000))

    def rate(fn) -> float:
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            best = max(best, len(blobs) / (time.perf_counter() - t0))
        return best

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return resize_crop(im.convert("RGB"), size)

    cores = cores_per_local_rank()
    all_cores = AllCoresDecode(blobs, cores, size)
    best_all_cores = max(all_cores.rate() for _ in range(3))
    all_cores.close()
    return {
        "simplejpeg_full_per_core": rate(lambda b: simplejpeg.decode_jpeg(b)),
        "simplejpeg_reduced_per_core": rate(lambda b: decode_scaled(b, size, None)),
        "simplejpeg_reduced_all_cores": best_all_cores,
        "cores": cores,
        "pil_decode_resize_per_core": rate(pil),
        "reduced_scale": "x".join(map(str, decode_scaled(blobs[0], size, None)[0].shape[1::-1])),
    }


def share_of_limit(results: list[dict], lim: dict) -> dict:
    """turbo:jpg's median as a share of the JPEG limit: cores x one core's reduced-scale decode,
    and the reduced-scale decode measured on all cores at once. The rest of its time goes to
    reading, the resize and the float conversion (docs/benchmarks.md)."""
    turbo = next((r for r in results if r.get("loader") == "turbo:jpg" and "median" in r), None)
    if turbo is None or not lim:
        return {}
    return {"turbo_of_cores_x_per_core": turbo["median"] / (lim["cores"] * lim["simplejpeg_reduced_per_core"]),
            "turbo_of_all_cores": turbo["median"] / lim["simplejpeg_reduced_all_cores"],
            "turbo_of_all_cores_interleaved": turbo.get("share_of_all_cores_decode")}


# ---------------------------------------------------------------------------------------------
# Output

def table(results: list[dict], info: dict, lim: dict) -> str:
    base = next((r["median"] for r in results if r.get("kind") == "pil" and "median" in r), None)
    m = info["machine"]
    others = [r["busy_cores_before"] for r in results if r.get("busy_cores_before") is not None]
    quiet = (f"each loader started when at most {max(others):.2f} cores were busy (--wait-idle)"
             if others else f"load average at start {m['load_avg_at_start']} (--wait-idle not used)")
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}; {quiet}",
             f"split {info['split']}, {info['images']} images per pass, batch {info['batch_size']}, "
             f"--workers {info['workers']} for each (the workers column: what each loader runs), "
             f"{info['repeats']} repeats after {info['warmup']} warm-up",
             "",
             f"{'loader':<11}{'data':<11}{'device':<7}{'workers':>8}{'img/s med':>11}{'min':>9}{'max':>9}"
             f"{'x pil':>8}{'peak RSS':>10}{'setup s':>9}{'others':>8}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['loader']:<11}error: {r['error']}")
            continue
        ratio = f"{r['median'] / base:.1f}x" if base else "-"
        workers = f"{r['workers']} {'thr' if r['workers_are'] == 'threads' else 'proc'}"
        lines.append(f"{r['loader']:<11}{r['data']:<11}{r['device']:<7}{workers:>8}{r['median']:>11.0f}"
                     f"{r['min']:>9.0f}{r['max']:>9.0f}{ratio:>8}{r['peak_rss_mb']:>8.0f}MB"
                     f"{r['setup_s']:>9.2f}{r['other_load_cores']:>8.2f}")
    if lim:
        lines += ["", f"limits per core (same JPEGs, one thread): simplejpeg full decode "
                      f"{lim['simplejpeg_full_per_core']:.0f} img/s, reduced-scale decode ({lim['reduced_scale']}) "
                      f"{lim['simplejpeg_reduced_per_core']:.0f} img/s, PIL decode+resize "
                      f"{lim['pil_decode_resize_per_core']:.0f} img/s; reduced-scale decode on all "
                      f"{lim['cores']} cores at once {lim['simplejpeg_reduced_all_cores']:.0f} img/s"]
        share = share_of_limit(results, lim)
        if share:
            inter = share["turbo_of_all_cores_interleaved"]
            lines.append(f"JPEG limit share: turbo:jpg {100 * share['turbo_of_cores_x_per_core']:.0f} % of cores x "
                         f"per-core reduced decode, {100 * share['turbo_of_all_cores']:.0f} % of the all-cores decode"
                         + (f" ({100 * inter:.0f} % of it timed between turbo's own passes)" if inter else ""))
    return "\n".join(lines)


def bar_chart(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "median" in r]
    names = [r["loader"] for r in ok]
    med = [r["median"] for r in ok]
    err = [[r["median"] - r["min"] for r in ok], [r["max"] - r["median"] for r in ok]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ok) + 1.5))
    ax.barh(names, med, xerr=err, color="tab:blue", capsize=3)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("images / s (median; bars: min-max), log scale")
    ax.set_title(title, fontsize=9)
    base = next((r["median"] for r in ok if r["kind"] == "pil"), None)
    for y, r in enumerate(ok):
        label = f" {r['median']:,.0f}" + (f"  ({r['median'] / base:.1f}x pil)" if base else "")
        ax.text(r["max"] * 1.08, y, label, va="center", fontsize=8)
    ax.set_xlim(right=max(r["max"] for r in ok) * 6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="shard directory (default: a synthetic CelebA, made once)")
    p.add_argument("--raw", type=Path, help="shard directory for the :rgb loaders (default: --data, "
                   "or the synthetic raw 64x64 shards)")
    p.add_argument("--folder", type=Path, help="image folder for pil (default: the manifest's image_dir)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--loaders", default=None,
                   help=f"comma list of KIND or KIND:MEMBER (default: all available: {','.join(ALL)})")
    p.add_argument("--images", type=int, default=4000, help="images per timed pass (default 4000, "
                   "capped at the split size)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--workers", type=int, default=2, help="worker processes / threads for every loader (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per loader (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", type=Path, default=Path("runs/bench/loader.json"),
                   help="write the results as JSON here (default runs/bench/loader.json)")
    p.add_argument("--png", type=Path, default=Path("runs/bench/loader.png"),
                   help="write the bar chart here (default runs/bench/loader.png)")
    p.add_argument("--csv", type=Path, default=Path("runs/bench/loader.csv"),
                   help="write the table as CSV here (default runs/bench/loader.csv)")
    p.add_argument("--synthetic", type=int, default=5000, help="images of the synthetic CelebA (default 5000)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "bench",
                   help="where the synthetic data lives (default ./data/bench)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each loader, wait up to SECONDS for the cores to go idle (default 0: don't)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one loader, print JSON
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0

    import torch

    try:
        if args.data is None:
            jpg_dir, rgb_dir = prepare_data(args.cache_dir, args.synthetic)
            rgb_dir = args.raw or rgb_dir
        else:
            jpg_dir, rgb_dir = args.data, args.raw or args.data
        from fastceleba.shards import load_manifest, raw_member

        has = {"jpg": "jpg" in load_manifest(jpg_dir)["members"],
               "rgb": raw_member(load_manifest(rgb_dir)) is not None and load_manifest(rgb_dir)["size"] == 64}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.loaders.split(",") if args.loaders else [n for n in ALL if n == "pil" or has[n.split(":")[1]]]
    info = {"machine": machine(), "split": args.split, "images": args.images, "batch_size": args.batch_size,
            "workers": args.workers, "repeats": args.repeats, "warmup": args.warmup, "device": device,
            "data": str(jpg_dir), "raw": str(rgb_dir)}
    results = []
    for name in names:
        kind, _, member = name.partition(":")
        member = member or ("jpg" if kind != "pil" else "")
        spec = {"name": name, "kind": kind, "member": member or "auto", "device": device,
                "data": str(rgb_dir if member == "rgb" else jpg_dir), "split": args.split,
                "folder": str(args.folder) if args.folder else None, "batch_size": args.batch_size,
                "workers": args.workers, "images": args.images, "repeats": args.repeats, "warmup": args.warmup}
        others = wait_idle(args.wait_idle) if args.wait_idle else None
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result = run_in_subprocess(spec)
        result["busy_cores_before"] = others
        results.append(result)
    if args.wait_idle and has["jpg"]:
        wait_idle(args.wait_idle)
    lim = limits(jpg_dir, args.split, args.images) if has["jpg"] else {}
    info["images"] = next((r["images"] for r in results if "images" in r), args.images)
    text = table(results, info, lim)
    print(text)
    report = {**info, "results": results, "limits": lim, "share_of_limit": share_of_limit(results, lim),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    atomic_write(args.json, json.dumps(report, indent=1) + "\n")
    keys = ["loader", "data", "device", "workers", "workers_are", "median", "min", "max", "peak_rss_mb", "setup_s",
            "other_load_cores"]
    rows = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in results if "median" in r]
    atomic_write(args.csv, "\n".join(rows) + "\n")
    m = info["machine"]
    bar_chart(results, args.png, f"{m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; "
                                 f"batch {args.batch_size}, {args.workers} workers")
    print(f"wrote {args.json}, {args.csv} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
