"""Agreement between the ranks of a multi-process run before (and around) its first collective.

A rank that fails alone during set-up (a missing manifest on one node's local copy, one corrupt shard, a
checkpoint its node does not hold) must not leave the other ranks waiting in NCCL until its timeout.
``agree`` runs a piece of set-up on every rank, all-gathers each rank's outcome (a small pickled object over
the process group: gloo on the CPU, NCCL on GPUs) and, if any rank failed, makes every rank raise the same
``AgreedError``: one line naming the failing rank(s), printed by rank 0 only (``quiet`` elsewhere), exit 2.
The same gather carries values, so rank 0's decisions (the resume point) reach every rank with it.

``out_layout`` finds out whether ``--out`` is one directory for all ranks: every node's first local process
writes a marker file with a random token into OUT/checkpoints, and every rank reports which tokens it
sees. Shared (every rank sees every token): rank 0 alone writes checkpoints. One local directory per node
(every rank sees exactly its own node's token): checkpoints are saved on each node (Accelerate's
``save_on_each_node``), the first local process of each node writing its node's copy, renaming its
temporary directory and clearing its stale ``.tmp-*``; on resume every node must hold the checkpoint rank 0
chose. We save per node rather than refuse, because node-local scratch disks are the common case on GPU
clusters and the checkpoint is small (weights + Adam state + one RNG file per rank); the final outputs
(metrics.jsonl, summary.json, model.safetensors, pictures) stay rank 0's, on rank 0's node. Anything in
between (some nodes sharing a directory, others not) stops with one line asking for one layout or the other.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from fastceleba.errors import DataError

T = TypeVar("T")
MARKER = ".tmp-node-"  # a .tmp-* name: a marker a crash leaves behind is cleared like a half-written save


class AgreedError(DataError):
    """A DataError that every rank raises alike; ``quiet`` on all but rank 0, so it is printed once."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class PeerFailed(RuntimeError):
    """Another rank failed with an unexpected error (a bug, not bad input): this rank stops too."""


def _gather(obj: Any, world: int) -> list:
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def fail_together(message: str, rank: int) -> AgreedError:
    """The error every rank raises once all know the same thing went wrong (printed by rank 0)."""
    return AgreedError(message, quiet=rank != 0)


def agree(rank: int, world: int, fn: Callable[[], T], share: bool = False) -> Any:
    """Run ``fn`` on every rank and all-gather the outcome; every rank raises alike if any rank failed.

    Returns fn's result on this rank, or with ``share=True`` the list of every rank's result (they must be
    small and picklable). A DataError on any rank becomes, on every rank, an AgreedError "rank R of N: ...",
    naming each rank that failed (distinct messages are all kept, on one line). Any other exception is
    re-raised on its rank and stops the others with PeerFailed. With one process, fn runs as is.
    """
    if world == 1:
        result = fn()
        return [result] if share else result
    result, failure, own = None, None, None
    try:
        result = fn()
    except DataError as e:
        failure = ("data", str(e))
    except Exception as e:  # a bug: keep its traceback on this rank, but do not leave the others waiting
        own, failure = e, ("bug", f"{type(e).__name__}: {e}")
    outcomes = _gather((failure, result if share and failure is None else None), world)
    failed = [(r, f) for r, (f, _) in enumerate(outcomes) if f is not None]
    if not failed:
        return [value for _, value in outcomes] if share else result
    if own is not None:
        raise own
    bugs = [r for r, (kind, _) in failed if kind == "bug"]
    if bugs:
        raise PeerFailed(f"{_ranks(bugs)} of {world} failed ({dict(failed)[bugs[0]][1]}); see its traceback")
    by_message: dict[str, list[int]] = {}
    for r, (_, message) in failed:
        by_message.setdefault(message, []).append(r)
    parts = [f"{_ranks(ranks)} of {world}: {message}" for message, ranks in by_message.items()]
    raise fail_together(parts[0] + "".join(f" [also {p}]" for p in parts[1:]), rank)


def from_rank0(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (torch.distributed.broadcast_object_list); call it only once every
    rank's set-up has been agreed, so that no rank is missing from the collective."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def same_data(rank: int, world: int, manifest: dict, where: Path) -> None:
    """Every rank reads the same shards: their manifest's splits (with every shard's sha256) and image
    options agree with rank 0's, else every rank stops with one line. Each node may keep its own copy, at
    its own path; a copy made again with other options, or of another version, is refused."""
    if world == 1:
        return
    keys = ("splits", "size", "crop", "members", "raw_member", "attr_names")
    digest = hashlib.sha256(json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()
    seen = _gather((digest, str(where)), world)
    other = [r for r, (d, _) in enumerate(seen) if d != seen[0][0]]
    if other:
        raise fail_together(f"{_ranks(other)} of {world}: {seen[other[0]][1]} describes other shards than "
                            f"rank 0's {seen[0][1]} (another version, or made with other options); give every "
                            f"node the same shards", rank)


@dataclass(frozen=True)
class OutLayout:
    """Where checkpoints are written: ``per_node`` when --out is a different directory on each node;
    ``writer`` when this rank writes checkpoint files (rank 0 if shared, else each node's first process)."""

    per_node: bool
    writer: bool


def out_layout(rank: int, world: int, local_main: bool, ckpt_dir: Path) -> OutLayout:
    """Find out whether ckpt_dir is shared by every rank, one per node, or neither (AgreedError).

    Collective: every rank must call it. Leaves no marker behind (the writers' clear_partial removes any).
    """
    if world == 1:
        return OutLayout(per_node=False, writer=True)

    def write_marker() -> str | None:
        if not local_main:
            return None
        token = secrets.token_hex(16)
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / f"{MARKER}{token}").write_text(token, encoding="utf-8")
        except OSError as e:
            raise DataError(f"{ckpt_dir}: cannot write there ({e.strerror or e}); pick another --out") from None
        return token

    by_rank = agree(rank, world, write_marker, share=True)  # also a barrier: every marker is written
    tokens = [t for t in by_rank if t is not None]

    def sees(token: str) -> bool:
        try:
            return (ckpt_dir / f"{MARKER}{token}").read_text(encoding="utf-8") == token
        except OSError:
            return False

    seen = _gather([t for t in tokens if sees(t)], world)
    if local_main:  # every rank has looked: the marker has done its job
        (ckpt_dir / f"{MARKER}{by_rank[rank]}").unlink(missing_ok=True)
    if all(len(s) == len(tokens) for s in seen):
        return OutLayout(per_node=False, writer=rank == 0)
    if all(len(s) == 1 for s in seen) and all(seen[r] == [t] for r, t in enumerate(by_rank) if t is not None):
        return OutLayout(per_node=True, writer=local_main)
    blind = [r for r, s in enumerate(seen) if len(s) != 1]
    raise fail_together(f"{ckpt_dir}: --out is shared by some nodes but not by all (as seen from "
                        f"{_ranks(blind)} of {world}); give every node the same shared --out, or each its own",
                        rank)


def node_local_note(layout: OutLayout) -> str | None:
    if layout.per_node:
        return ("note: --out is not shared between the nodes; each node keeps its own checkpoints there "
                "(outputs and metrics are written on rank 0's node)")
    return None


# how a collective reports that another process of the group is gone (gloo's TCP pairs; NCCL's watchdog)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def peer_lost(error: BaseException) -> str | None:
    """If `error` is a collective failing because another process of the run is gone, one line for this
    rank to print instead of a traceback through our code (the process that stopped first printed why);
    else None. One rank meeting bad data mid-epoch exits at once: on one node the launcher then stops
    the others, across nodes they learn it here, at their next collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    if not (isinstance(error, backend_error) or any(s in str(error) for s in _PEER_GONE)):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cause = str(error).strip().splitlines()[0].split(" This is typically")[0][:200]
    return (f"rank {rank} of {world}: another process of this run stopped, so this one stops too ({cause}); "
            f"its own \"error:\" line, on its node, says why: fix that and re-run with --resume")


def release_group() -> None:
    """Tear the process group down before exiting on an agreed error (NCCL warns, or hangs, otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

