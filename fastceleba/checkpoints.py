"""Training checkpoints of fastceleba/train.py: naming, saving, pruning, finding, and resume state.

A checkpoint is OUT/checkpoints/epoch_N, written by ``accelerator.save_state`` into a temporary
``.tmp-epoch_N`` directory and renamed once complete (``trainer_state.json``, written last, marks it
complete); only the newest KEEP_CHECKPOINTS are kept. Weights are stored as safetensors under plain layer
names (never "module.*"), so a checkpoint does not depend on the number of processes. This module never
decides *when* to save or what a run does with a resumed state: the training loop does.
"""

from __future__ import annotations

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


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (epoch, dir), oldest first; half-written ones live in .tmp-* dirs and are ignored."""
    found = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            m = re.fullmatch(r"epoch_(\d+)", d.name)
            if m and (d / "trainer_state.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


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


def clear_partial(ckpt_dir: Path) -> None:
    """Remove saves that a crash cut short (.tmp-* directories); main process only."""
    for partial in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, record: dict[str, Any]) -> Path:
    """accelerator.save_state into a temp dir, then rename it to epoch_N: a crash leaves the older ones intact.

    ``record`` (epoch, step, model, ...) becomes trainer_state.json; "format" is added here.
    """
    record = {"format": CHECKPOINT_FORMAT, **record}
    final = ckpt_dir / f"epoch_{record['epoch']}"
    tmp = ckpt_dir / f".tmp-epoch_{record['epoch']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # weights (safetensors), optimizer, RNG state of every rank
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", record)  # written last: marks the checkpoint complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def register_weight_hooks(accelerator: Accelerator) -> None:
    """Store checkpoint weights under plain layer names and load them without pickle.

    Accelerate would save DDP weights as "module.*"; the hooks keep checkpoints independent of the number
    of processes and give a DataError, not a stack trace, for weights of another shape.
    """
    def on_save(models: list, weights: list, output_dir: str) -> None:
        weights[:] = [accelerator.unwrap_model(m).state_dict() for m in models]

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
