"""Training checkpoints of fastceleba/train.py: naming, saving, pruning, finding, and resume state.

A checkpoint is OUT/checkpoints/epoch_N (after epoch N) or OUT/checkpoints/step_S (mid-epoch, after
global step S: a run stopped by a signal, or --checkpoint-every-steps), written by
``accelerator.save_state`` into a temporary ``.tmp-NAME`` directory and renamed once complete
(``trainer_state.json``, written last, marks it complete). The newest KEEP_CHECKPOINTS epoch
checkpoints are kept, and one step checkpoint only while it is newer than all of them. With several processes, rank 0 decides which
checkpoint to resume from and every rank checks that it sees that one (``check_resume_point``); when --out
is a different directory on each node (fastceleba/distributed.py), each node's first process writes,
renames and prunes its node's copy (``writer``). Weights are stored as safetensors under plain layer
names (never "module.*"), so a checkpoint does not depend on the number of processes. This module never
decides *when* to save or what a run does with a resumed state: the training loop does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file

from fastceleba.errors import DataError
from fastceleba.files import write_json

CHECKPOINT_FORMAT = "fastceleba-checkpoint"
KEEP_CHECKPOINTS = 2


def model_desc(name: str, latent_dim: int | None) -> str:
    """The flags that build a model, as a user would type them."""
    return f"--model {name}" + (f" --latent-dim {latent_dim}" if name == "vae" else "")


def _global_step(ckpt: Path) -> int:
    """The step a checkpoint was written after (-1 if its record is unreadable: read_trainer_state says why)."""
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (global step, dir), oldest first, an epoch's before a step checkpoint of the
    same step; half-written ones live in .tmp-* dirs and are ignored."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            if re.fullmatch(r"(epoch|step)_\d+", d.name) and (d / "trainer_state.json").is_file():
                found.append((_global_step(d), d.name.startswith("step_"), d))
    return [(step, d) for step, _, d in sorted(found)]


def read_trainer_state(ckpt: Path, model: str, latent_dim: int) -> dict:
    """The checkpoint's own record (plain JSON); DataError if it belongs to another model or latent size."""
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        assert state.get("format") == CHECKPOINT_FORMAT and isinstance(state.get("epoch"), int)
    except (OSError, ValueError, AssertionError):
        raise DataError(f"{path}: not a fastceleba checkpoint record; delete {ckpt} or pick a new --out") from None
    want = (model, latent_dim if model == "vae" else None)
    have = (state.get("model"), state.get("latent_dim"))
    if have != want:
        raise DataError(f"{ckpt}: checkpoint is for {model_desc(*have)}, not {model_desc(*want)}; "
                        f"pass the same flags to --resume it, or pick a new --out")
    return state


def find_resume(ckpt_dir: Path, resume: bool, model: str, latent_dim: int) -> tuple[Path | None, dict | None]:
    """(newest checkpoint, its trainer state) to continue from, or (None, None) for a fresh run.

    DataError when the directory holds checkpoints but --resume was not given (a new run would mix with
    the old one), or when the checkpoint is of another model.
    """
    found = checkpoints(ckpt_dir)
    if found and not resume:
        raise DataError(f"{ckpt_dir}: holds checkpoints of an earlier run; pass --resume to continue it, "
                        f"or pick a new --out")
    if not (resume and found):
        return None, None
    newest = found[-1][1]
    return newest, read_trainer_state(newest, model, latent_dim)


def check_resume_point(ckpt_dir: Path, chosen: tuple[str, dict] | None, writer: bool) -> Path | None:
    """On every rank: the checkpoint rank 0 chose (``chosen``: its name and trainer state), as seen here.

    DataError when this rank cannot see it, or sees another run's checkpoint under that name (the trainer
    states differ), or when rank 0 starts afresh but this rank writes into a directory that already holds
    checkpoints (node-local --out: they would mix with the new run's). On a shared --out this only
    re-reads what rank 0 read.
    """
    if chosen is None:
        if writer and checkpoints(ckpt_dir):
            raise DataError(f"{ckpt_dir}: holds checkpoints but rank 0's --out has none to resume from; "
                            f"delete them, or copy rank 0's checkpoints here, or pick a new --out")
        return None
    name, state = chosen
    path = ckpt_dir / name
    if not (path / "trainer_state.json").is_file():
        raise DataError(f"{path}: not found here, but rank 0 resumes from its {name}; with a --out local "
                        f"to each node, copy rank 0's {path.parent.name}/{name} to this node, "
                        f"or use a shared --out")
    try:
        mine = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        mine = None
    if mine != state:
        raise DataError(f"{path}: not the checkpoint rank 0 resumes from (its trainer_state.json differs); "
                        f"copy rank 0's {name} here, or pick a new --out")
    return path


def clear_partial(ckpt_dir: Path) -> None:
    """Remove saves that a crash cut short (.tmp-* directories and markers); one writer per directory."""
    for partial in ckpt_dir.glob(".tmp-*"):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, record: dict[str, Any],
                    writer: bool | None = None) -> Path:
    """accelerator.save_state into a temp dir, then rename it to epoch_N (``record["epoch_step"]`` 0: the epoch
    is complete) or step_S (mid-epoch): a crash leaves the older ones intact.

    ``record`` (epoch, step, epoch_step, model, ...) becomes trainer_state.json; "format" is added here. ``writer``: this
    rank creates, completes, renames and prunes the directory (default: the main process; with a --out
    local to each node, each node's first process, and ``accelerator.project_configuration.save_on_each_node``
    must then be set so that Accelerate writes weights and optimizer state on every node too).
    """
    writer = accelerator.is_main_process if writer is None else writer
    record = {"format": CHECKPOINT_FORMAT, **record}
    name = f"step_{record['step']}" if record.get("epoch_step") else f"epoch_{record['epoch']}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # weights (safetensors), optimizer, RNG state of every rank
    accelerator.wait_for_everyone()
    if writer:
        write_json(tmp / "trainer_state.json", record)  # written last: marks the checkpoint complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(ckpt_dir)
    accelerator.wait_for_everyone()
    return final


def prune(ckpt_dir: Path) -> None:
    """Keep the newest KEEP_CHECKPOINTS epoch checkpoints, and the newest step checkpoint while it is newer."""
    found = checkpoints(ckpt_dir)
    epochs = [(step, d) for step, d in found if d.name.startswith("epoch_")]
    steps = [(step, d) for step, d in found if d.name.startswith("step_")]
    newest_epoch = epochs[-1][0] if epochs else -1
    old = [d for _, d in epochs[:-KEEP_CHECKPOINTS]]
    old += [d for i, (step, d) in enumerate(steps) if i < len(steps) - 1 or step <= newest_epoch]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)


def register_weight_hooks(accelerator: Accelerator) -> None:
    """Store checkpoint weights under plain layer names and load them without pickle.

    Accelerate would save DDP weights as "module.*"; the hooks keep checkpoints independent of the number
    of processes and give a DataError, not a stack trace, for weights of another shape.
    """
    def on_save(models: list, weights: list, output_dir: str) -> None:
        # contiguous: safetensors refuses the strides of channels-last weights
        weights[:] = [{k: v.contiguous() for k, v in accelerator.unwrap_model(m).state_dict().items()}
                      for m in models]

    def on_load(models: list, input_dir: str) -> None:
        path = Path(input_dir) / "model.safetensors"
        for model in models:
            target = accelerator.unwrap_model(model)
            try:
                tensors = load_file(str(path))  # safetensors: never unpickles
            except Exception as e:
                raise DataError(f"{path}: unreadable ({e}); delete {input_dir} to resume from an older one") from None
            expected = target.state_dict()
            if tensors.keys() != expected.keys() or any(tensors[k].shape != v.shape for k, v in expected.items()):
                raise DataError(f"{path}: weights do not fit this model; resume with the flags that made it "
                                f"or pick a new --out")
            target.load_state_dict(tensors)
        models.clear()  # loaded here; Accelerate must not load them again

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


@contextlib.contextmanager
def scaler_saved_once(accelerator: Accelerator):
    """Accelerate's save_state writes fp16's scaler.pt from every rank to the same path (the other files
    from the main process, or one per rank); let only the process that writes the others write it."""
    scaler = accelerator.scaler
    each_node = accelerator.project_configuration.save_on_each_node
    writes = accelerator.is_local_main_process if each_node else accelerator.is_main_process
    if scaler is not None and not writes:
        accelerator.scaler = None
    try:
        yield
    finally:
        accelerator.scaler = scaler


def load_resume_state(accelerator: Accelerator, resume: Path, state: dict, log: Any) -> None:
    """accelerator.load_state, across precisions: a checkpoint without scaler.pt (trained in fp32/bf16, or
    fp16 on a CPU, which has no scaler) resumed in fp16 starts the GradScaler afresh instead of failing with
    FileNotFoundError; an fp16 checkpoint resumed in another precision leaves its scaler.pt unused."""
    saved = state.get("mixed_precision", "unrecorded")
    now = accelerator.mixed_precision
    scaler = accelerator.scaler
    fresh = scaler is not None and not (resume / "scaler.pt").is_file()
    if fresh:
        accelerator.scaler = None  # so load_state does not look for scaler.pt
    try:
        accelerator.load_state(str(resume))  # weights via our hook; optimizer and RNG with weights_only=True
    finally:
        accelerator.scaler = scaler
    if fresh:
        log(f"note: the checkpoint was trained with mixed precision {saved} and has no loss scale; fp16's "
            f"GradScaler starts afresh (scale {scaler.get_scale():g}; its first steps may be skipped)")
    elif saved != now:
        log(f"note: the checkpoint was trained with mixed precision {saved}; continuing with {now}")
