"""The epoch plan every loader kind follows: which samples, in which order, on which rank.

Everything here is a pure function of (seed, epoch, rank, world size, split size, batch size), so
all ranks agree without talking to each other and a resumed run replays an epoch exactly:

* ``epoch_order``: the split in shard order, or with shuffling a permutation seeded by (seed, epoch).
* ``epoch_flips``: per-sample horizontal-flip decisions, seeded by (seed, epoch).
* ``rank_slice``: rank r of W takes the contiguous slice [r*N//W, (r+1)*N//W) (DALI's own rule).
* ``batch_counts`` / ``rank_plan``: the batches each rank yields, padding with ``valid=False``
  (drop_last=False) or dropping the remainder (drop_last=True), the same count on every rank.

Loader modules never decide orders, rank slices or padding themselves: they ask this module.
"""

from __future__ import annotations

import numpy as np

# Independent random streams drawn from one (seed, epoch); a stream number names what it drives.
ORDER_STREAM, FLIP_STREAM, WORKER_STREAM = 0, 1, 2


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed that depends only on (seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all ``n`` samples, the same on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(epoch_seed(seed, epoch, ORDER_STREAM)).permutation(n)


def epoch_flips(n: int, flip: bool, seed: int, epoch: int) -> np.ndarray:
    """Per-sample flip decisions for the epoch, indexed by sample (not by position)."""
    if not flip:
        return np.zeros(n, bool)
    return np.random.default_rng(epoch_seed(seed, epoch, FLIP_STREAM)).random(n) < 0.5


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``n`` ordered samples (DALI's sharding rule)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def batch_counts(n: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(batches per rank, samples per rank including padding); the same on every rank."""
    if drop_last:
        per_rank = (n // world_size) // batch_size * batch_size
    else:
        per_rank = -(-n // world_size)
    return -(-per_rank // batch_size), per_rank


def rank_plan(order: np.ndarray, batch_size: int, rank: int, world_size: int,
              drop_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, valid) of one rank's epoch, given the epoch order of all samples."""
    lo, hi = rank_slice(len(order), rank, world_size)
    _, per_rank = batch_counts(len(order), batch_size, world_size, drop_last)
    mine = order[lo:hi][:per_rank]
    pad = per_rank - len(mine)
    valid = np.ones(per_rank, bool)
    if pad:
        mine = np.concatenate([mine, np.repeat(mine[-1:], pad)])
        valid[-pad:] = False
    return mine, valid


def split_batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive batch slices of ``n`` planned positions (the last may be shorter)."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
