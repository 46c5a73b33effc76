"""bench/gpu_check.py end to end: on a machine without a GPU it runs, skips every GPU item with its
reason, passes its CPU items, and its report lists every GPU path issue 11 section 1 names.

One real run of the command (a subprocess, --quick) is shared by the tests of this module. On a
machine with CUDA the run is limited to the CPU items (the full GPU pass is `make gpu-check`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CUDA = torch.cuda.is_available()
sys.path.append(str(ROOT / "bench"))  # last: bench/train.py and bench/loader.py must not shadow anything
import gpucheck_harness as harness  # noqa: E402
from gpucheck_harness import Item  # noqa: E402

# What issue 11 section 1 says the command must execute, as the report's path keys.
ISSUE_PATHS = {
    "gpu-tests",            # the GPU-only tests
    "bench-loader-gpu",     # the GPU section of bench/loader.py
    "dali-mixed",           # DALI 'mixed' graph and iterator
    "dali-device-id",       # the DALI device id
    "cache-device-epoch",   # the cache on the device: index_select, flip, float conversion
    "pinned-copy",          # pinned non-blocking copies
    "pin-memory",           # DataLoader pin_memory
    "default-loader",       # the default-loader choice
    "ae", "vae", "fp32", "fp16", "bf16", "compile",  # short AE and VAE runs, eager and compiled
    "fp16-scaler-resume",   # the fp16 GradScaler with scaler.pt saved and resumed
    "cuda-autocast-eval",   # CUDA autocast in evaluation and pictures
    "cuda-generators",      # CUDA generators in metrics, pictures and sampling
    "nccl",                 # NCCL instead of gloo
    "ddp-replicas",         # replicas stay identical
    "ddp-eval-once",        # every test image evaluated exactly once
}
TRAIN_MATRIX = {f"train:{m}-{p}{c}" for m in ("ae", "vae") for p in ("fp32", "fp16", "bf16") for c in ("", "-compile")}
GPU_ITEMS = TRAIN_MATRIX | {
    "gpu:pytest", "gpu:bench-loader", "loader:pil-cuda", "loader:wds-cuda", "loader:turbo-cuda",
    "loader:cache-cuda-flip", "loader:dali-mixed", "loader:dali-cuda1", "train:vae-fp16-resume", "train:ddp-nccl",
}
CPU_ITEMS = {"data:synthetic", "data:shard-jpg", "data:shard-rgb64", "cpu:find-gpu-tests", "cpu:loaders",
             "cpu:bench-loader", "cpu:train-2-steps"}


def gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    extra = ["--only", "data:*,cpu:*"] if CUDA else []
    proc = gpu_check("--quick", "--images", 200, "--out", out, *extra)
    report = json.loads((out / "report.json").read_text())
    return proc, report, out


def items(report) -> dict[str, dict]:
    return {i["name"]: i for i in report["items"]}


def test_runs_and_exits_0_without_failures(run):
    proc, report, _ = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["summary"]["failed"] == 0
    assert sum(report["summary"].values()) == len(report["items"])


def test_every_required_item_is_listed_once(run):
    _, report, _ = run
    names = [i["name"] for i in report["items"]]
    assert len(names) == len(set(names))
    assert GPU_ITEMS | CPU_ITEMS <= set(names), sorted((GPU_ITEMS | CPU_ITEMS) - set(names))


def test_items_cover_every_gpu_path_of_the_issue(run):
    _, report, _ = run
    covered = {c for i in report["items"] for c in i["covers"]}
    assert ISSUE_PATHS <= covered, sorted(ISSUE_PATHS - covered)
    assert ISSUE_PATHS <= set(report["paths"])
    # only items that run under CUDA may claim a GPU path
    assert all("cuda" in i["needs"] for i in report["items"] if i["covers"])


def test_cpu_items_pass_and_gpu_items_skip_with_their_reason(run):
    _, report, out = run
    by_name = items(report)
    for name in CPU_ITEMS:
        item = by_name[name]
        assert item["status"] == "passed", (name, item.get("error"))
        assert item["seconds"] >= 0 and Path(item["log"]).is_file()
    for item in report["items"]:
        if "cuda" not in item["needs"]:
            continue
        assert item["status"] == "skipped" and item["reason"], item
        if not CUDA:
            assert item["reason"].startswith("no CUDA device"), item
            assert "error" not in item and "details" not in item
    if not CUDA:
        assert by_name["env:cuda"]["status"] == "skipped"
        assert by_name["env:cuda"]["reason"].startswith("no CUDA device")
        assert set(report["uncovered_paths"]) >= ISSUE_PATHS  # nothing claimed as verified without a GPU


def test_cpu_items_check_what_they_say(run):
    _, report, _ = run
    by_name = items(report)
    jpg = by_name["data:shard-jpg"]["details"]
    assert "jpg" in jpg["members"] and "rgb8" not in jpg["members"]  # DALI must decode the JPEG member
    assert "rgb8" in by_name["data:shard-rgb64"]["details"]["members"]
    gpu_tests = by_name["cpu:find-gpu-tests"]["details"]["gpu_tests"]
    assert any("test_batches_arrive_on_the_gpu" in t for t in gpu_tests)
    assert not any("test_cuda_without_a_gpu_is_refused" in t for t in gpu_tests)  # runs without a GPU
    loaders = by_name["cpu:loaders"]["details"]
    for probe in loaders.values():
        assert probe["device"] == "cpu" and probe["images"] == jpg["splits"]["valid"]
        assert probe["max_mad_vs_pil_x255"] <= 2
    assert ("dali-cpu" in loaders) == (report["environment"]["dali"]["version"] is not None)
    assert by_name["cpu:train-2-steps"]["details"]["steps"] == 2


def test_report_has_environment_facts(run):
    _, report, _ = run
    env = report["environment"]
    assert report["format"] == "fastceleba-gpu-check" and report["version"] == 1
    assert env["cpu_count"] >= 1 and env["torch"]["version"] == torch.__version__
    assert env["torch"]["cuda_available"] == CUDA and "cuda_build" in env["torch"]
    assert "version" in env["dali"] and "path" in env["nvidia_smi"]
    if env["nvidia_smi"]["path"]:  # a GPU machine: the driver and nvidia-smi's own output
        assert "driver_version" in env and env["nvidia_smi"]["output"]
    assert env["packages"]["accelerate"]


def test_prints_a_table_of_every_item(run):
    proc, report, out = run
    for item in report["items"]:
        assert any(line.startswith(item["name"] + " ") and item["status"] in line for line in proc.stdout.splitlines())
    assert f"report: {out / 'report.json'}" in proc.stdout


def test_help_and_bad_usage(tmp_path):
    proc = gpu_check("--help")
    assert proc.returncode == 0
    for flag in ("--out", "--json", "--quick", "--budget", "--only", "--list", "--images", "--steps",
                 "--batch-size", "--workers", "--ddp-processes", "--timeout"):
        assert flag in proc.stdout
    assert "Exit status: 0 nothing failed, 1 at least one item failed, 2 bad usage" in proc.stdout
    for flags in (["--steps", "0"], ["--images", "10"], ["--ddp-processes", "1"], ["--budget", "-1"],
                  ["--no-such-flag"]):
        assert gpu_check(*flags, "--out", tmp_path).returncode == 2, flags
    assert not (tmp_path / "report.json").exists()
    bad = gpu_check("--only", "no-such-item", "--out", tmp_path)
    assert bad.returncode == 2 and "matches no item" in bad.stderr


# ---------------------------------------------------------------------------------------------------- the harness
def facts(cuda: bool = False, smi_gpus: list | None = None, imports: dict | None = None) -> dict:
    """An environment() dict as a machine with or without a GPU gives it (only the keys the harness reads)."""
    return {"torch": {"version": torch.__version__, "cuda_build": "13.0", "cuda_available": cuda,
                      "device_count": int(cuda), "cuda_warnings": [], "bf16_supported": cuda,
                      "devices": [{"index": 0, "name": "H100", "capability": "9.0"}] if cuda else []},
            "dali": {"version": "2.4.0"}, "cpu_count": 16, "nvidia_smi": {"path": None, "gpus": smi_gpus or []},
            "imports": imports if imports is not None else {name: None for name in harness.GPU_STACK}}


def test_the_result_line_is_found_among_torch_and_nccl_warnings():
    """An item's result was the last line starting with { or [: torch's and NCCL's `[W1207 ...]` warnings
    (printed at exit, after the result) were read as it and a passing item failed."""
    warning = "[W1207 10:11:12.345678 ProcessGroupNCCL.cpp:1250] Warning: WARNING: process group has NOT been destroyed"
    text = "\n".join(["[I1207 10:11:10 init.cpp:77] starting", harness.result_line([{"kind": "dali", "images": 82}]),
                      warning, "[rank0]:[W1207 socket.cpp:767] [c10d] client socket failed", "{not a result"])
    assert harness.parse_result(text) == [{"kind": "dali", "images": 82}]
    assert harness.parse_result(warning + "\n" + harness.result_line({"a": 1})) == {"a": 1}
    with pytest.raises(harness.Failure, match="printed no GPU_CHECK_RESULT line"):
        harness.parse_result('{"looks": "like a result"}\n' + warning)


def test_budget_stops_starting_items_and_each_item_leaves_a_complete_report(tmp_path):
    args = harness.parse_args(["--out", str(tmp_path), "--budget", "100", "--quick"], "")
    env = facts()
    chk = harness.Check(args, env, SCRIPT)
    on_disk = {}

    def passes(_chk):
        return {"ok": True}

    def reads_the_report(_chk):  # what a kill at this moment would leave behind
        on_disk.update({i["name"]: (i["status"], i.get("reason")) for i in json.loads(args.json.read_text())["items"]})
        return {}

    items = [Item("a", "fits", [], passes, estimate_s=40),
             Item("gpu", "needs a GPU", [], passes, needs=("cuda",), estimate_s=1000),
             Item("b", "fits, uses a", [], reads_the_report, after=("a",), estimate_s=40),
             Item("c", "would end past the budget", [], passes, estimate_s=60),
             Item("d", "would fit, but comes after c", [], passes, estimate_s=1)]

    def save():
        harness.save_report(args.json, harness.build_report([], args, env, items, {}, "now", 0.0))

    # 50 s already spent (e.g. on the machine's facts): a and b fit (50 + 40 <= 100), c does not
    harness.run_items(items, chk, {i.name for i in items}, args.budget, time.monotonic() - 50, save)
    assert on_disk["a"][0] == "passed" and on_disk["gpu"] == ("skipped", "no CUDA device")
    assert on_disk["b"] == ("running", harness.RUNNING)
    assert on_disk["c"] == on_disk["d"] == ("not run", harness.NOT_REACHED)
    final = json.loads(args.json.read_text())
    status = {i["name"]: i["status"] for i in final["items"]}
    assert status == {"a": "passed", "gpu": "skipped", "b": "passed", "c": "not run", "d": "not run"}
    for item in final["items"][3:]:
        assert item["reason"].startswith("not run: budget (--budget 100 s;"), item
    assert final["summary"] == {"passed": 2, "failed": 0, "skipped": 1, "not run": 2}


def test_a_child_still_running_at_the_end_of_the_budget_is_killed(tmp_path):
    chk = harness.Check(harness.parse_args(["--out", str(tmp_path)], ""), facts(), SCRIPT)
    chk.item, chk.deadline = "sleeper", time.monotonic() + 2
    t0 = time.monotonic()
    with pytest.raises(harness.Failure, match="the end of --budget"):
        chk.sh([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - t0 < 30


def test_a_gpu_without_dali_simplejpeg_or_webdataset_is_not_a_pass(tmp_path, capsys):
    no_dali = {"nvidia.dali": "ModuleNotFoundError: No module named 'nvidia'", "simplejpeg": None, "webdataset": None}
    problem = "nvidia.dali is not importable (ModuleNotFoundError: No module named 'nvidia')"
    assert harness.gpu_stack_problems(facts(cuda=True, imports=no_dali)) == [problem]
    assert harness.gpu_stack_problems(facts(smi_gpus=[{"index": "0"}], imports=no_dali)) == [problem]
    assert harness.gpu_stack_problems(facts(cuda=False, imports=no_dali)) == []  # the CPU items need none
    assert harness.gpu_stack_problems(facts(cuda=True)) == []
    both = dict(no_dali, webdataset="ModuleNotFoundError: No module named 'webdataset'")
    assert len(harness.gpu_stack_problems(facts(cuda=True, imports=both))) == 2

    args = harness.parse_args(["--out", str(tmp_path)], "")
    items = [Item("env:cuda", "CUDA usable", [], lambda c: {})]
    items[0].result = {"name": "env:cuda", "covers": [], "status": "passed", "seconds": 1.0}
    for imports, status in ((no_dali, 3), (None, 0)):
        report = harness.build_report([], args, facts(cuda=True, imports=imports), items, {}, "now", 1.0)
        assert list(report).index("not_a_pass") < list(report).index("items")
        assert harness.print_summary(report, items, args.json) == status
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].startswith("NOT A PASS: a GPU is present but " + problem) == (status == 3), lines[:3]


def test_a_budget_too_small_for_any_item_reports_every_item(tmp_path):
    proc = gpu_check("--budget", "1", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for item in report["items"]:
        if CUDA or "cuda" not in item["needs"]:
            assert item["status"] == "not run" and item["reason"].startswith("not run: budget"), item
        else:
            assert item["status"] == "skipped" and item["reason"] == "no CUDA device", item
    assert report["summary"]["not run"] >= 8 and report["budget_s"] == 1
    assert "not run (--budget 1 s)" in proc.stdout
