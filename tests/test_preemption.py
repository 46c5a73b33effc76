"""SIGTERM and Ctrl-C: train.py stops after its current step with a checkpoint, and --resume goes on exactly.

Real subprocesses in their own process group (as a scheduler sees a job), real signals, real
`accelerate launch` over gloo; weights compared byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastceleba.checkpoints import KEEP_CHECKPOINTS, checkpoints, prune
from fastceleba.files import write_json
from fastceleba.shardwriter import ShardOptions, write_shards
from fastceleba.synth import generate

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastceleba" / "train.py")
LAUNCH2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
# 480 train images at batch 8: 60 steps an epoch, long enough to be stopped inside one.
RUN = ["--loader", "cache", "--batch-size", "8", "--workers", "1", "--epochs", "2", "--eval-every", "0",
       "--no-test", "--no-pictures"]
LINE = re.compile(r"stopped at epoch (\d+) step (\d+) by (\S+(?: [a-z ]+)?); checkpoint (\S+); --resume goes on")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeba600")
    generate(root, 600, seed=0, progress=False)
    out = tmp_path_factory.mktemp("shards600")
    write_shards(root, out, ShardOptions(size=64, shard_size=200), progress=False)
    return out


def digest(out: Path) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def finish(cmd: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*cmd, "--out", str(out), *extra], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def stop_after(cmd: list[str], out: Path, first_checkpoint: str, sig: int = signal.SIGTERM,
               whole_group: bool = False) -> tuple[int, str]:
    """Start `cmd` in its own session; once `first_checkpoint` exists, send `sig` to its leader (or, as
    SLURM and a terminal's Ctrl-C do, to every process of its group); (exit status, stderr)."""
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / first_checkpoint / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, sig) if whole_group else proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("whole")
    finish([sys.executable, TRAIN, "--data", str(data), *RUN], out)
    return digest(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_stops_with_a_checkpoint_and_resume_is_exact(data, tmp_path, uninterrupted, sig):
    cmd = [sys.executable, TRAIN, "--data", str(data), *RUN, "--checkpoint-every-steps", "4"]
    out = tmp_path / "cut"
    status, err = stop_after(cmd, out, "step_64", sig)  # epoch 2 has begun
    assert status == 5, err[-3000:]
    m = LINE.search(err)
    assert m, err[-3000:]
    epoch, step, by, where = int(m[1]), int(m[2]), m[3], Path(m[4])
    assert epoch == 2 and 64 <= step < 120 and by == signal.Signals(sig).name
    assert where == out / "checkpoints" / f"step_{step}"
    # The stop's checkpoint is the only step checkpoint kept, beside the complete epoch before it.
    assert [d.name for _, d in checkpoints(out / "checkpoints")] == ["epoch_1", f"step_{step}"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    resumed = finish([sys.executable, TRAIN, "--data", str(data), *RUN, "--resume"], out)
    assert f"resuming from {where} (epoch 1, batch {step - 60} of epoch 2, step {step})" in resumed.stdout
    assert digest(out) == uninterrupted
    assert [d.name for _, d in checkpoints(out / "checkpoints")] == ["epoch_1", "epoch_2"]


def test_two_processes_stop_at_the_same_step_and_resume_exactly(data, tmp_path):
    """SIGTERM to every process of the job (a scheduler's way): the launcher forwards it once more, both
    ranks agree on one step, one checkpoint, one line; the resumed pair ends as an uninterrupted pair."""
    cmd = [*LAUNCH2, TRAIN, "--data", str(data), *RUN, "--checkpoint-every-steps", "3"]  # 30 steps an epoch
    whole = tmp_path / "whole"
    finish(cmd, whole)
    out = tmp_path / "cut"
    status, err = stop_after(cmd, out, "step_33", whole_group=True)
    assert status != 0
    lines = LINE.findall(err)
    assert len(lines) == 1, err[-3000:]  # printed once, by rank 0
    epoch, step, by, where = lines[0]
    assert epoch == "2" and 33 <= int(step) < 60 and by == "SIGTERM"
    assert (Path(where) / "trainer_state.json").exists() and "Traceback" not in err
    finish([*LAUNCH2, TRAIN, "--data", str(data), *RUN, "--resume"], out)
    assert digest(out) == digest(whole)


SECOND = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from fastceleba.preemption import REPEAT_WINDOW, StopSignal
stop = StopSignal().install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)   # within the window: the launcher's forward of the same stop
time.sleep(0.05)
print("asked", stop.requested, stop.name, flush=True)
time.sleep(REPEAT_WINDOW + 0.1)
os.kill(os.getpid(), signal.SIGTERM)  # a second stop: at once
time.sleep(5)
print("still running", flush=True)
"""


def test_a_second_signal_stops_at_once():
    proc = subprocess.run([sys.executable, "-c", SECOND, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == ["asked True SIGTERM"]
    assert proc.returncode == -signal.SIGTERM
    assert "stopping at once (SIGTERM again)" in proc.stderr


def test_prune_keeps_the_newest_epochs_and_one_newer_step_checkpoint(tmp_path):
    def make(name: str, step: int) -> None:
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "trainer_state.json", {"step": step})

    for name, step in [("epoch_1", 10), ("epoch_2", 20), ("step_25", 25), ("epoch_3", 30), ("step_33", 33),
                       ("step_36", 36)]:
        make(name, step)
    prune(tmp_path)
    assert [d.name for _, d in checkpoints(tmp_path)] == ["epoch_2", "epoch_3", "step_36"][-KEEP_CHECKPOINTS - 1:]
    make("epoch_4", 40)
    prune(tmp_path)
    assert [d.name for _, d in checkpoints(tmp_path)] == ["epoch_3", "epoch_4"]
