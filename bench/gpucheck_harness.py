"""The harness of bench/gpu_check.py: items, the state they share, running them within a budget,
the machine's facts, the report and the table. The items themselves are gpu_check.py's.

Every item runs through ``run_items``: skipped when this machine lacks what it needs (with the
reason), "not run: budget" when its estimated seconds no longer fit ``--budget``, else passed or
failed. The report is rewritten (atomically) before and after every item, so a run killed at a
machine's time limit still leaves a complete report: the item it was killed in says "running",
the ones after it "not run: not reached".

A result a child process hands back is one line, ``RESULT_PREFIX`` + JSON; torch and NCCL print
warnings such as ``[W1207 ...]`` on the same streams, so only that line is read.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastceleba.files import write_json  # noqa: E402

REPORT_FORMAT = "fastceleba-gpu-check"
REPORT_VERSION = 1
RESULT_PREFIX = "GPU_CHECK_RESULT "
QUICK_BUDGET_S = 540  # --quick: what a GPU machine lent for 10 minutes a command leaves after start-up
# What a GPU run needs besides torch: the default GPU loader (DALI) and the loaders' libraries.
GPU_STACK = ("nvidia.dali", "simplejpeg", "webdataset")


class Failure(Exception):
    """An item failed; the message is one line."""


class Skip(Exception):
    """An item cannot run here; the message says why."""


@dataclass
class Item:
    name: str
    what: str
    covers: list[str]
    run: Callable[["Check"], dict]
    needs: tuple[str, ...] = ()  # of "cuda", "multi_gpu", "dali", "bf16"
    after: tuple[str, ...] = ()  # items whose output this one uses
    # seconds it takes at --quick sizes on one H100-class GPU (an estimate, for --budget; x2 without --quick)
    estimate_s: float = 30
    result: dict = field(default_factory=dict)


def result_line(value: Any) -> str:
    """The one line a child process prints to hand its result back."""
    return RESULT_PREFIX + json.dumps(value)


def parse_result(text: str) -> Any:
    """The last result line of a child's output; any other line (warnings, progress) is ignored."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise Failure(f"printed no {RESULT_PREFIX.strip()} line: {last_error_line(text)}")


# ---------------------------------------------------------------------------------------------------- environment
def _run_quiet(cmd: list[str], timeout: float = 30) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return -1, f"{type(e).__name__}: {e}"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> dict:
    """torch's view of CUDA; run in a child process (``--facts``) so that a CUDA start-up that crashes
    or hangs cannot take the check down, and the check itself holds no CUDA context."""
    import torch

    with warnings.catch_warnings(record=True) as caught:  # e.g. "the NVIDIA driver on your system is too old"
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    t: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                         "cuda_available": available, "device_count": torch.cuda.device_count() if available else 0,
                         "cuda_warnings": [str(w.message).strip() for w in caught]}
    try:
        t["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001 - a fact, not a check
        t["cudnn"] = f"unavailable ({e})"
    if available:
        t["devices"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            t["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gb": round(p.total_memory / 2**30, 1),
                                 "multiprocessors": p.multi_processor_count})
        try:  # native bf16 (compute capability >= 8.0), not torch's emulation on older GPUs
            t["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            t["bf16_supported"] = torch.cuda.is_bf16_supported()
        try:
            t["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            t["nccl"] = f"unavailable ({e})"
    return t


def environment(script: Path) -> dict:
    """Facts a bug report needs: versions, GPUs, driver, CPUs, memory, relevant environment variables.
    ``script --facts`` prints torch's (see torch_facts)."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "hostname": platform.node(),
    }
    try:
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        env["cpu_affinity"] = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                env["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    rc, out = _run_quiet(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    env["git_commit"] = out if rc == 0 else None
    rc, out = _run_quiet(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = bool(out) if rc == 0 else None
    env["packages"] = {d: _version(d) for d in (
        "torch", "torchvision", "accelerate", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "webdataset",
        "numpy", "triton", "simplejpeg", "pillow", "safetensors", "pytest")}

    try:
        p = subprocess.run([sys.executable, str(script), "--facts"], capture_output=True, text=True, timeout=300)
        env["torch"] = parse_result(p.stdout)
    except Exception as e:  # noqa: BLE001 - it crashed (e.g. a segfault in a broken driver) or hung
        detail = (f"exit status {p.returncode}: {last_error_line(p.stderr)}" if "p" in locals()
                  else f"{type(e).__name__}: {e}")
        env["torch"] = {"version": _version("torch"), "cuda_build": None, "cuda_available": False,
                        "device_count": 0, "cuda_warnings": [], "probe_error": detail}
    try:
        import nvidia.dali as dali

        env["dali"] = {"version": dali.__version__}
    except Exception as e:  # noqa: BLE001 - not installed, or its CUDA libraries fail to load
        env["dali"] = {"version": None, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    env["imports"] = {}  # None: importable; else why not
    for name in GPU_STACK:
        try:
            __import__(name)
            env["imports"][name] = None
        except Exception as e:  # noqa: BLE001 - not installed, or a library of its own fails to load
            env["imports"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    smi = shutil.which("nvidia-smi")
    env["nvidia_smi"] = {"path": smi}
    if smi:
        rc, out = _run_quiet([smi, "--query-gpu=index,name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"])
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if rc == 0 and line.strip()]
        env["nvidia_smi"]["gpus"] = [dict(zip(("index", "name", "driver", "memory", "compute_cap"), r))
                                     for r in rows]
        env["driver_version"] = rows[0][2] if rows and len(rows[0]) > 2 else None
        env["nvidia_smi"]["output"] = _run_quiet([smi])[1]
    from accelerate.commands.config import default_config_file

    cfg = Path(default_config_file)
    env["accelerate_config"] = {"path": str(cfg), "content": cfg.read_text()[:4000] if cfg.is_file() else None}
    env["variables"] = {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("CUDA_", "NCCL_", "ACCELERATE_", "TORCH", "NVIDIA_", "OMP_", "PYTORCH_"))
                        or k in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    return env


# ---------------------------------------------------------------------------------------------------- the harness
def last_error_line(text: str) -> str:
    """The line of a failed process's output that says what went wrong (not the launcher's echo)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    launcher = ("subprocess.CalledProcessError", "CalledProcessError", "E0", "W0", "[rank")
    for line in reversed(lines):
        if line.startswith("error: ") or (("Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0])
                                          and not line.startswith(launcher)):
            return line[:500]
    return lines[-1][:500] if lines else "(no output)"


class Check:
    """The state shared by the items: options, paths, what this machine has, the subprocess runner."""

    def __init__(self, args: argparse.Namespace, env: dict, script: Path):
        self.args, self.env, self.script = args, env, script
        self.deadline = float("inf")  # time.monotonic() past which no child may run (run_items sets it)
        self.out = args.out
        self.data, self.runs, self.logs = self.out / "data", self.out / "runs", self.out / "logs"
        t = env["torch"]
        self.cuda = bool(t["cuda_available"])
        self.gpus = t["device_count"] if self.cuda else 0
        self.dali = env["dali"]["version"] is not None
        self.bf16 = bool(t.get("bf16_supported"))
        self.item = ""

    # data made by the data:* items
    @property
    def celeba(self) -> Path:
        return self.data / "celeba"

    @property
    def jpg(self) -> Path:
        return self.data / "shards-jpg"

    @property
    def rgb(self) -> Path:
        return self.data / "shards-rgb64"

    def split_sizes(self) -> dict[str, int]:
        manifest = json.loads((self.jpg / "manifest.json").read_text())
        return {s: int(v["num_samples"]) for s, v in manifest["splits"].items()}

    def env_vars(self, extra: dict | None = None, path: list | None = None) -> dict:
        old = os.environ.get("PYTHONPATH", "")
        first = os.pathsep.join(str(p) for p in [*(path or []), ROOT])
        return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {}),
                "PYTHONPATH": first + (os.pathsep + old if old else "")}

    def sh(self, cmd: list, log: str | None = None, check: bool = True, env: dict | None = None,
           path: list | None = None) -> tuple[int, str]:
        """Run cmd (in its own process group, killed whole on timeout); log stdout+stderr; return (rc, output)."""
        cmd = [str(c) for c in cmd]
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{(log or self.item).replace(':', '_').replace('/', '_')}.log"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env_vars(env, path), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            limit = min(self.args.timeout, max(1.0, self.deadline - time.monotonic()))
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training processes it started
                proc.wait()
                why = "--timeout" if limit == self.args.timeout else "the end of --budget"
                raise Failure(f"timed out after {limit:.0f} s ({why}); see {log_path}") from None
        text = log_path.read_text(encoding="utf-8", errors="replace")
        text = text[text.rfind(f"$ {' '.join(cmd)}\n"):]
        if check and rc != 0:
            raise Failure(f"exit status {rc}: {last_error_line(text)}")
        return rc, text

    def python(self, *args) -> list:
        return [sys.executable, *args]

    def launch(self, precision: str = "no", processes: int = 1) -> list:
        """`accelerate launch` with every setting explicit, so no `accelerate config` file changes the run."""
        multi = ["--multi_gpu"] if processes > 1 else []
        return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_machines", "1",
                "--num_processes", str(processes), "--mixed_precision", precision, "--dynamo_backend", "no"]

    def probe(self, spec: dict | list) -> Any:
        """Run a make_loader probe (gpu_check.probe) in a fresh process; its result line is the answer."""
        _, text = self.sh(self.python(self.script, "--probe", json.dumps(spec)))
        return parse_result(text)


def missing(item: Item, chk: Check) -> str | None:
    """What this machine lacks for the item (a GPU, two, DALI, native bf16), or None."""
    for need in item.needs:
        if need == "cuda" and not chk.cuda:
            if chk.env.get("nvidia_smi", {}).get("gpus"):
                return "CUDA unusable by torch although nvidia-smi lists GPUs (see env:cuda)"
            return "no CUDA device"
        if need == "multi_gpu" and chk.gpus < 2:
            return f"needs >= 2 GPUs (found {chk.gpus})"
        if need == "dali" and not chk.dali:
            return f"DALI not installed or not importable ({chk.env['dali'].get('error', '')})"
        if need == "bf16" and chk.cuda and not chk.bf16:
            caps = ", ".join(d["capability"] for d in chk.env["torch"].get("devices", []))
            return f"bf16 needs compute capability >= 8.0 (found {caps})"
    return None


def blocked(item: Item, done: dict[str, Item]) -> str | None:
    """The item whose output this one needs and that did not pass, or None."""
    for dep in item.after:
        status = done[dep].result.get("status")
        if status != "passed":
            return f"needs {dep}, which {status}"
    return None


NOT_REACHED = "not run: not reached (the check stopped before it; killed?)"
RUNNING = "running when the report was last written: the check was killed in this item, or still runs"
STATUSES = ("passed", "failed", "skipped", "not run")
GRACE_S = 30  # an item started within the budget may overrun its estimate by this much before it is killed


def run_items(items: list[Item], chk: Check, selected: set[str], budget: float | None, started: float,
              save: Callable[[], None]) -> None:
    """Run the items in order; ``save()`` writes the report, before and after every item. With a
    budget (seconds from ``started``, a time.monotonic()), the first item that would run whose estimate
    no longer fits, and every one after it, is "not run: budget"; children are killed GRACE_S after it."""
    scale = 1 if chk.args.quick else 2
    for item in items:
        item.result = {"name": item.name, "what": item.what, "covers": item.covers, "needs": list(item.needs),
                       "estimate_s": item.estimate_s * scale, "status": "not run", "reason": NOT_REACHED,
                       "seconds": 0.0}
    chk.deadline = started + budget + GRACE_S if budget else float("inf")
    save()
    done: dict[str, Item] = {}
    over_budget = False
    for item in items:
        chk.item = item.name
        t0 = time.perf_counter()
        res = {k: v for k, v in item.result.items() if k not in ("status", "reason")}
        used = time.monotonic() - started
        # free reasons first (they say what the machine lacks), then the budget, then a failed dependency
        reason = None if item.name in selected else "not selected (--only)"
        reason = reason or missing(item, chk)
        if not reason and (over_budget or (budget and used + res["estimate_s"] > budget)):
            over_budget = True
            res.update(status="not run", reason=f"not run: budget (--budget {budget:g} s; {used:.0f} s used, "
                                                f"this item takes ~{res['estimate_s']:.0f} s)")
        elif reason := reason or blocked(item, done):
            res.update(status="skipped", reason=reason)
        else:
            item.result = {**res, "status": "running", "reason": RUNNING}
            save()
            print(f"[gpu-check] {item.name}: {item.what} ...", file=sys.stderr, flush=True)
            try:
                res.update(status="passed", details=item.run(chk) or {})
            except Skip as e:
                res.update(status="skipped", reason=str(e))
            except Failure as e:
                res.update(status="failed", error=str(e))
            except Exception as e:  # noqa: BLE001 - a bug of the check itself is a failure too, never a crash
                res.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            log = chk.logs / f"{item.name.replace(':', '_').replace('/', '_')}.log"
            if log.exists():
                res["log"] = str(log)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        item.result = res
        done[item.name] = item
        save()


def select(items: list[Item], only: str | None) -> set[str]:
    """The names --only's patterns pick, with the items they need (their data); empty if none matches."""
    if not only:
        return {i.name for i in items}
    patterns = [s.strip() for s in only.split(",") if s.strip()]
    selected = {i.name for i in items if any(fnmatch.fnmatchcase(i.name, pat) for pat in patterns)}
    for i in items:
        if i.name in selected:
            for dep in i.after:
                selected.add(dep)
                selected.update(next(d for d in items if d.name == dep).after)
    return selected


def gpu_stack_problems(env: dict) -> list[str]:
    """Why a run on this machine cannot pass however its items end: on a machine with a GPU (torch sees
    CUDA, or nvidia-smi lists GPUs) DALI, simplejpeg and webdataset must import, or the default GPU
    loader (and the loaders that need them) go untested. [] without a GPU or when all import."""
    if not (env["torch"].get("cuda_available") or env.get("nvidia_smi", {}).get("gpus")):
        return []
    return [f"{name} is not importable ({why})" for name, why in env.get("imports", {}).items() if why]


def build_report(argv: list[str], args: argparse.Namespace, env: dict, items: list[Item], paths: dict,
                 started: str, wall_s: float) -> dict:
    results = [i.result for i in items]
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "command": " ".join([Path(sys.argv[0]).name] + argv), "quick": args.quick, "budget_s": args.budget,
        "started": started, "wall_s": round(wall_s, 1),
        # first in the file: a GPU machine without DALI & co. never reads as a pass
        "not_a_pass": gpu_stack_problems(env),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "probe"},
        "environment": env, "summary": {s: sum(r["status"] == s for r in results) for s in STATUSES},
        "paths": paths, "items": results,
        "uncovered_paths": sorted(set(paths) - {c for r in results if r["status"] == "passed" for c in r["covers"]}),
    }


def save_report(path: Path, report: dict) -> None:
    write_json(path, report)  # atomic: a kill mid-write leaves the previous report whole


def print_summary(report: dict, items: list[Item], path: Path) -> int:
    """The table and its summary; returns the exit status (1 an item failed, 3 not a pass, else 0)."""
    env, counts, problems = report["environment"], report["summary"], report["not_a_pass"]
    t = env["torch"]
    gpus = ", ".join(d["name"] for d in t.get("devices", [])) or "none"
    print(f"fastceleba gpu check: torch {t['version']} (CUDA {t['cuda_build']}), driver "
          f"{env.get('driver_version') or '-'}, DALI {env['dali']['version'] or 'not installed'}, "
          f"GPUs: {gpus}, {env['cpu_count']} CPUs")
    for problem in problems:
        print(f"NOT A PASS: a GPU is present but {problem}: the default GPU loader is untested; "
              f"bring the wheels (docs/gpus.md) and run again")
    print(table(items))
    budget = f" (--budget {report['budget_s']:g} s)" if report["budget_s"] else ""
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['not run']} not run{budget} in {report['wall_s']:.0f} s; report: {path}")
    if report["uncovered_paths"]:
        print(f"GPU paths not verified on this machine: {', '.join(report['uncovered_paths'])}")
    return 1 if counts["failed"] else 3 if problems else 0


def table(items: list[Item]) -> str:
    width = max(len(i.name) for i in items) + 2
    lines = [f"{'item':<{width}}{'status':<9}{'seconds':>8}  note", "-" * (width + 60)]
    for i in items:
        r = i.result
        note = r.get("error") or r.get("reason") or ""
        d = r.get("details") or {}
        if not note and "test_psnr" in d:
            note = f"{d['device']} {d.get('loader', 'cache')} {d['steps']} steps, test PSNR {d['test_psnr']} dB"
        elif not note and "max_mad_vs_pil_x255" in d:
            note = f"max MAD vs pil {d['max_mad_vs_pil_x255']}/255" + (
                f", vs CPU {d['max_mad_vs_cpu_x255']}/255" if "max_mad_vs_cpu_x255" in d else "")
        elif not note and "images_per_s" in d:
            workers = d.get("workers", {})
            note = ", ".join(f"{k} {v}/s" + (f" ({workers[k]})" if k in workers else "")
                             for k, v in d["images_per_s"].items())
        lines.append(f"{i.name:<{width}}{r['status']:<9}{r['seconds']:>8.1f}  {note[:160]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """bench/gpu_check.py's options; ``description`` is its --help text."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                   help="working directory: data, runs, logs/ (one log per item) and the report "
                        "(default runs/gpu_check; its data/ and runs/ are remade each time)")
    p.add_argument("--json", type=Path, default=None, help="the JSON report (default OUT/report.json)")
    p.add_argument("--quick", action="store_true",
                   help="a shorter pass: 410 synthetic images, 3 training steps, one bench pass of 256 images, "
                        f"and --budget {QUICK_BUDGET_S} unless --budget is given")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no item whose estimated seconds (--list) would end past SECONDS from the start; "
                        "it and the items after it are reported 'not run: budget', and a child still running "
                        f"{GRACE_S} s after SECONDS is killed (default: none; --quick {QUICK_BUDGET_S}; 0: none)")
    p.add_argument("--only", default=None, metavar="PATTERNS",
                   help="comma list of item-name patterns to run, e.g. 'train:*,loader:dali*'; the data items "
                        "they need run too; the others are listed as skipped")
    p.add_argument("--list", action="store_true",
                   help="list the items in the order they run, what each needs and its estimated seconds, then exit")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic CelebA size (default 1010, --quick 410: odd valid/test splits so two GPUs pad)")
    p.add_argument("--steps", type=int, default=None, help="steps of each short training run (default 6, --quick 3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per process in the training runs (default 32)")
    p.add_argument("--workers", type=int, default=2, help="loader workers/threads everywhere (default 2)")
    p.add_argument("--ddp-processes", type=int, default=2,
                   help="processes (GPUs) of the multi-GPU runs (default 2; needs that many GPUs)")
    p.add_argument("--timeout", type=float, default=1200,
                   help="seconds one command of an item may run (default 1200)")
    p.add_argument("--probe", help=argparse.SUPPRESS)        # internal: one make_loader probe, JSON out
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 410 if args.quick else 1010
    if args.steps is None:
        args.steps = 3 if args.quick else 6
    if args.budget is None and args.quick:
        args.budget = QUICK_BUDGET_S
    if args.budget is not None and args.budget < 0:
        p.error("--budget must be >= 0")
    args.budget = args.budget or None  # 0: no budget
    for name in ("images", "steps", "batch_size", "ddp_processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.ddp_processes < 2:
        p.error("--ddp-processes must be >= 2")
    if args.workers < 0 or args.timeout <= 0:
        p.error("--workers must be >= 0 and --timeout > 0")
    if args.images < 50:
        p.error("--images must be >= 50 (a split needs a full training batch)")
    if args.images * 8 // 10 < args.batch_size * args.ddp_processes:
        p.error(f"--images {args.images} gives fewer training images than one step of "
                f"{args.batch_size} x {args.ddp_processes} processes; raise --images or lower --batch-size")
    args.out = args.out.resolve()
    args.json = (args.json or args.out / "report.json").resolve()
    return args


# ---------------------------------------------------------------------------------------------------- pytest plugin
def pytest_collection_modifyitems(config, items):  # noqa: D103 - active only with GPU_CHECK_SELECT=1
    """As a pytest plugin (`-p gpucheck_harness`, with bench/ on the path): keep the tests that skip
    without a GPU, i.e. whose skipif reason says it needs a GPU or CUDA ("needs a GPU", "requires
    CUDA", "needs >= 2 GPUs") or that carry a `gpu` marker; list their ids in the file named by
    GPU_CHECK_SELECT (without it the plugin does nothing)."""
    listing = os.environ.get("GPU_CHECK_SELECT")
    if not listing:
        return
    import re

    needs_gpu = re.compile(r"\b(needs?|requires?)\b.*\b(gpus?|cuda)\b", re.IGNORECASE)  # "needs a GPU"
    keep, drop = [], []
    for item in items:
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        if item.get_closest_marker("gpu") or any(needs_gpu.search(r) for r in reasons):
            keep.append(item)
        else:
            drop.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
    Path(listing).write_text("".join(f"{item.nodeid}\n" for item in keep))
