"""Two "nodes" without a shared filesystem, simulated on one machine: resume, checkpoints, errors.

Each node is its own real `accelerate launch --multi_gpu --num_machines 2 --num_processes 2 --machine_rank R`
(one CPU process per node, both joining one gloo group on 127.0.0.1), exactly the command a user runs on
each of two hosts. Each gets its own --out (and, where a test needs it, its own --data): to train.py that is
the same flag naming a different disk on each node, with no test-only hook in the code. Every launch runs
under a timeout; a run that reaches it is a hang and fails the test. The last test uses one launch with two
processes and a shared --out, then resumes its checkpoint with one process.

Only gloo on one host is exercised here: NCCL, two real hosts and a network filesystem are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fastceleba.shardwriter import ShardOptions, write_shards
from fastceleba.synth import generate

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fastceleba" / "train.py"
RANK_HASH = ROOT / "tests" / "train_rank_hash.py"
FAST = ["--loader", "cache", "--batch-size", "8", "--workers", "1", "--no-pictures", "--no-test",
        "--eval-every", "0"]
HANG = 300  # seconds: far above a run here (~15-30 s); reaching it means the ranks hung


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> Path:
    """120 faces: 96 train (6 steps of 8 per rank on 2 ranks), 12 valid, 12 test."""
    root = tmp_path_factory.mktemp("celeba120")
    generate(root, 120, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def data(celeba, tmp_path_factory) -> Path:
    root = celeba
    out = tmp_path_factory.mktemp("shards120")
    write_shards(root, out, ShardOptions(size=64, shard_size=50), progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


class Node:
    """The outcome of one node's launch: launcher status, the training process's status, its output."""

    def __init__(self, launcher_rc: int, output: str):
        self.launcher_rc, self.output = launcher_rc, output
        # torchrun reports a failed worker's status as "exitcode  : N"; a worker that succeeded is not listed.
        found = re.search(r"exitcode\s*:\s*(-?\d+)", output)
        self.rc = int(found.group(1)) if found else launcher_rc

    def our_traceback(self) -> bool:
        """A traceback through our code (the launcher prints its own ChildFailedError one for any failure)."""
        return bool(re.search(r'File ".*/(fastceleba|tests)/', self.output))

    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]


def two_nodes(tmp_path: Path, per_node: list[list], script: Path = RANK_HASH) -> list[Node]:
    """Launch node 0 and node 1 (one process each) with their own train.py arguments; fail on a hang."""
    port, procs, logs = free_port(), [], []
    for r, args in enumerate(per_node):
        log = open(tmp_path / f"node{r}-{time.monotonic_ns()}.log", "w+")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + HANG
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:  # stop what we started: each launch is its own process group
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    nodes = []
    for p, log in zip(procs, logs):
        log.seek(0)
        nodes.append(Node(p.returncode, log.read()))
        log.close()
    assert not hung, "the ranks hung:\n" + "\n".join(n.output[-3000:] for n in nodes)
    return nodes


def ok(nodes: list[Node]) -> list[Node]:
    for n in nodes:
        assert n.launcher_rc == 0, n.output[-4000:]
    return nodes


def ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_node_local_out_checkpoints_on_each_node_and_resumes(data, tmp_path):
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]  # one --out, a different disk per node
    common = ["--data", data, "--epochs", "1", *FAST]
    nodes = ok(two_nodes(tmp_path, [[*common, "--out", o] for o in outs]))
    assert "note: --out is not shared between the nodes" in nodes[0].output
    for r, out in enumerate(outs):  # each node wrote, and renamed, its own complete copy
        assert ckpts(out) == ["epoch_1"]
        files = sorted(p.name for p in (out / "checkpoints" / "epoch_1").iterdir())
        assert files == ["model.safetensors", "optimizer.bin", f"random_states_{r}.pkl", "trainer_state.json"]
    assert (outs[0] / "summary.json").exists() and not (outs[1] / "summary.json").exists()  # rank 0's outputs

    (outs[1] / "checkpoints" / ".tmp-epoch_7").mkdir()  # a save a crash cut short on node 1
    nodes = ok(two_nodes(tmp_path, [[*common, "--out", o, "--epochs", "2", "--resume"] for o in outs]))
    assert "resuming from" in nodes[0].output and "(epoch 1, step 6)" in nodes[0].output
    assert ckpts(outs[0]) == ckpts(outs[1]) == ["epoch_1", "epoch_2"]  # .tmp-epoch_7 cleared on node 1
    hashes = {(o / f"weights-rank{r}.sha256").read_text() for r, o in enumerate(outs)}
    assert len(hashes) == 1  # both ranks resumed the same state and trained together
    assert json.loads((outs[0] / "summary.json").read_text())["steps"] == 12

    # Node 1 lost its copy of the newest checkpoint: rank 0's choice (epoch_2) reaches rank 1, which cannot
    # load it, and both stop with the same line, printed once.
    shutil.rmtree(outs[1] / "checkpoints" / "epoch_2")
    nodes = two_nodes(tmp_path, [[*common, "--out", o, "--epochs", "3", "--resume"] for o in outs], script=TRAIN)
    assert [n.rc for n in nodes] == [2, 2], [n.output[-3000:] for n in nodes]
    errors = nodes[0].errors() + nodes[1].errors()
    assert errors == [f"error: rank 1 of 2: {outs[1] / 'checkpoints' / 'epoch_2'}: not found here, but rank 0 "
                      f"resumes from its epoch_2; with a --out local to each node, copy rank 0's "
                      f"checkpoints/epoch_2 to this node, or use a shared --out"]
    assert not nodes[0].our_traceback() and not nodes[1].our_traceback()

    # A node whose --out holds an older run while rank 0 starts afresh would mix the two: refused.
    fresh = tmp_path / "node0" / "fresh"
    nodes = two_nodes(tmp_path, [[*common, "--out", fresh], [*common, "--out", outs[1]]], script=TRAIN)
    assert [n.rc for n in nodes] == [2, 2]
    assert nodes[0].errors() == [f"error: rank 1 of 2: {outs[1] / 'checkpoints'}: holds checkpoints but rank 0's "
                                 f"--out has none to resume from; delete them, or copy rank 0's checkpoints "
                                 f"here, or pick a new --out"] and not nodes[1].errors()


@pytest.mark.parametrize("damage", ["truncated", "other"])
def test_data_error_on_one_node_stops_both_with_one_line(celeba, data, tmp_path, damage):
    local = tmp_path / "node1-shards"  # node 1's local copy of the shards
    if damage == "truncated":  # node 1's copy of one shard is cut short
        shutil.copytree(data, local)
        tar = sorted(local.glob("train-*.tar"))[0]
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
        expected = f"error: rank 1 of 2: {tar}"
    else:  # sound shards, but not the same: made again with another shard size
        write_shards(celeba, local, ShardOptions(size=64, shard_size=40), progress=False)
        expected = (f"error: rank 1 of 2: {local / 'manifest.json'} describes other shards than rank 0's "
                    f"{data / 'manifest.json'} (another version, or made with other options); give every node "
                    f"the same shards")
    args = [["--data", data, "--out", tmp_path / "out0", *FAST],
            ["--data", local, "--out", tmp_path / "out1", *FAST]]
    nodes = two_nodes(tmp_path, args, script=TRAIN)
    assert [n.rc for n in nodes] == [2, 2], [n.output[-3000:] for n in nodes]  # both exit 2, neither hangs
    assert len(nodes[0].errors()) == 1 and nodes[0].errors()[0].startswith(expected), nodes[0].output[-3000:]
    assert nodes[1].errors() == []  # printed once, by rank 0
    assert not nodes[0].our_traceback() and not nodes[1].our_traceback()


def test_bad_image_mid_epoch_on_one_node_stops_both_with_one_line_each(celeba, tmp_path):
    # JPEG shards read by a streaming loader: node 1 meets a corrupt image inside its epoch, long after the
    # set-up checks agreed. It stops with its own line (status 2); node 0 learns it at its next collective
    # and stops with one line that points there (status 4), not with gloo's traceback, and neither hangs.
    data = tmp_path / "shards"
    write_shards(celeba, data, ShardOptions(shard_size=50), progress=False)
    local = tmp_path / "node1-shards"
    shutil.copytree(data, local)
    for tar in sorted(local.glob("train-*.tar")):  # one bad image in each, whichever shards rank 1 reads
        with tarfile.open(tar) as t:
            jpg = [m for m in t.getmembers() if m.name.endswith(".jpg")][5]
        raw = bytearray(tar.read_bytes())
        raw[jpg.offset_data:jpg.offset_data + 16] = b"\0" * 16  # no JPEG SOI marker; same size, same manifest
        tar.write_bytes(bytes(raw))
    flags = [*FAST[FAST.index("--batch-size"):], "--loader", "wds", "--epochs", "2"]
    nodes = two_nodes(tmp_path, [["--data", data, "--out", tmp_path / "out0", *flags],
                                 ["--data", local, "--out", tmp_path / "out1", *flags]], script=TRAIN)
    assert [n.rc for n in nodes] == [4, 2], [n.output[-3000:] for n in nodes]
    (bad,) = nodes[1].errors()
    assert re.match(rf"error: {re.escape(str(local))}/train-0000\d\.tar: \d+\.jpg does not decode", bad), bad
    (lost,) = nodes[0].errors()
    assert lost.startswith("error: rank 0 of 2: another process of this run stopped") and "--resume" in lost
    assert not nodes[0].our_traceback() and not nodes[1].our_traceback()


def test_only_a_lost_peer_becomes_the_one_line():
    import torch.distributed as dist

    from fastceleba.distributed import peer_lost
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:57754. This is "
                        "typically caused by a remote worker crashing. Check the logs of the remote worker.")
    assert peer_lost(gone) is None  # no process group: nothing to lose
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        line = peer_lost(gone)
        assert line.startswith("rank 0 of 1: another process of this run stopped, so this one stops too (")
        assert "Connection closed by peer [127.0.0.1]:57754.)" in line and "typically" not in line
        assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays a bug
    finally:
        dist.destroy_process_group()


def test_resume_on_another_number_of_processes(data, tmp_path):
    out = tmp_path / "run"  # one shared --out
    common = ["--data", data, "--out", out, *FAST]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--mixed_precision", "no", "--dynamo_backend", "no"]

    def run(cmd: list) -> subprocess.CompletedProcess:
        proc = subprocess.run([*map(str, cmd)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=HANG)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run([*launcher, TRAIN, *common, "--epochs", "1"])  # 2 processes: 6 steps per epoch
    proc = run([sys.executable, TRAIN, *common, "--epochs", "2", "--resume"])  # 1 process: 12 steps per epoch
    text = proc.stdout + proc.stderr
    assert "resuming from" in text and "(epoch 1, step 6)" in text
    assert "note: processes, batch size or seed differ from the checkpoint's; the data order will not match" in text
    assert "not shared" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["steps"] == 6 + 12
    state = json.loads((out / "checkpoints" / "epoch_2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1 and state["step"] == 18
