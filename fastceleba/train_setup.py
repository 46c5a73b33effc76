"""Everything a training run holds before its first step: the device, the data, the model and optimizer,
and the point it resumes from. ``set_up(args)`` builds it on every rank and returns it as a ``Run``.

Before the first collective of training every rank's set-up is agreed (fastceleba/distributed.py): a
DataError on one rank stops all of them with the same line instead of leaving them waiting.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from fastceleba import remote
from fastceleba.checkpoints import (check_resume_point, clear_partial, find_resume, load_resume_state, model_desc,
                                    register_weight_hooks)
from fastceleba.distributed import OutLayout, agree, from_rank0, node_local_note, out_layout, same_data
from fastceleba.errors import DataError
from fastceleba.files import atomic_write
from fastceleba.loaders import make_loader
from fastceleba.models import build_model
from fastceleba.recipe import Recipe, initialize, recipe_from_args
from fastceleba.runtime import cpu_asked, main_print, make_accelerator, set_backends
from fastceleba.train_args import per_process_batch
from fastceleba.train_loop import make_loss_fn


@dataclass
class Run:
    """One rank's view of a training run, as set up."""
    accelerator: Accelerator
    log: Callable[..., None]       # prints once, on the main process
    out: Path
    ckpt_dir: Path
    layout: OutLayout              # who writes checkpoints (shared or node-local --out)
    recipe: Recipe
    model: torch.nn.Module         # prepared (DDP-wrapped with several processes)
    raw: torch.nn.Module           # the same weights, unwrapped: evaluation, pictures, saving
    optimizer: torch.optim.Optimizer
    loss_fn: Any
    manifest: dict
    sizes: dict[str, int]
    train_loader: Any
    plain_train: Any               # the train split in order, unaugmented: mean image, attribute vectors
    plain_own: Any                 # plain_train if it holds anything to release (a cache view holds nothing)
    valid_loader: Any
    test_loader: Any
    start_epoch: int               # epochs complete before this run
    step: int                      # optimizer steps taken before this run
    start_batch: int               # batches of epoch start_epoch already trained (a mid-epoch resume)
    resumed_from: Path | None
    total_steps: int
    log_trackers: bool

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def split_size(manifest: dict, split: str) -> int:
    return int(manifest.get("splits", {}).get(split, {}).get("num_samples", 0))


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line (inf for a line a crash cut short, so it is dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def set_up(args: argparse.Namespace) -> Run:
    data, out = remote.location(args.data), Path(args.out)  # a Path, or a URL / pipe: (wds streams it)
    accelerator = make_accelerator(args, out)
    log = main_print(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    args.batch_size = per_process_batch(args, world)
    kernels = set_backends(args.deterministic, accelerator.device.type == "cuda")
    ckpt_dir = out / "checkpoints"
    layout = out_layout(rank, world, accelerator.is_local_main_process, ckpt_dir)
    accelerator.project_configuration.save_on_each_node = layout.per_node

    recipe = recipe_from_args(args)
    set_seed(args.seed)  # the same initial weights on every rank
    model = initialize(build_model(args.model, args.latent_dim), recipe.init, recipe.logvar_bias, recipe.icnr)
    if args.channels_last:  # before Adam, so its state takes the same layout; train_one_epoch converts x
        model = model.to(memory_format=torch.channels_last)

    def loader(split: str, **kw: Any) -> Any:
        kw.setdefault("batch_size", args.batch_size)
        return make_loader(args.loader, str(data), split, device=accelerator.device, seed=args.seed, rank=rank,
                           world_size=world, num_workers=args.workers, crop=args.crop, **kw)

    def loaders() -> tuple:
        manifest = remote.read_manifest(data)  # DataError naming the fix when there are no shards
        sizes = {s: split_size(manifest, s) for s in ("train", "valid", "test")}
        if sizes["train"] < args.batch_size * world:
            raise DataError(f"{data / 'manifest.json'}: {sizes['train']} training images are fewer than one step "
                            f"({args.batch_size} x {world} processes); lower --batch-size")
        train_loader = loader("train", shuffle=True, drop_last=True, flip=args.flip)
        # In order, unaugmented, every image once: the mean image and the attribute vectors. For "cache" a
        # view of the split it already holds decoded (no second decode, no second copy).
        plain_train = train_loader.view() if args.loader == "cache" else loader("train")
        valid_loader = loader("valid") if sizes["valid"] else None
        test_loader = loader("test") if sizes["test"] else None
        return manifest, sizes, train_loader, plain_train, valid_loader, test_loader

    def decide_resume() -> tuple[str, dict] | None:  # rank 0 decides; the others learn it through agree
        if rank != 0:
            return None
        found, state = find_resume(ckpt_dir, args.resume, args.model, args.latent_dim)
        return None if state is None else (found.name, state)

    mine, manifest, sizes, train_loader, plain_train, valid_loader, test_loader = agree(
        rank, world, lambda: (decide_resume(), *loaders()))
    same_data(rank, world, manifest, data / "manifest.json")
    chosen = from_rank0(mine, world)
    resume = agree(rank, world, lambda: check_resume_point(ckpt_dir, chosen, layout.writer))
    state = None if chosen is None else chosen[1]

    # the recipe sets lr before every step
    adam = {"betas": (0.9, recipe.adam_beta2), "eps": recipe.adam_eps}
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, **adam)
    model, optimizer = accelerator.prepare(model, optimizer)  # loaders are sharded already: never prepared
    loss_fn = make_loss_fn(model, args.model, recipe.reduction, args.compile, recipe.free_bits)
    register_weight_hooks(accelerator)

    start_epoch, step, start_batch = 0, 0, 0
    if state is not None:
        # weights via our hook; optimizer and RNG with weights_only=True. A different number of processes
        # resumes too: the weights and Adam state are whole in every checkpoint, each rank loads
        # random_states_<rank>.pkl if there is one, and train.py re-seeds every epoch anyway.
        agree(rank, world, lambda: load_resume_state(accelerator, resume, state, log))
        start_epoch, step, start_batch = state["epoch"], state["step"], state.get("epoch_step", 0)
        for group in optimizer.param_groups:  # loading restored the checkpoint's betas and eps: the recipe's apply
            group.update(adam)
        if state.get("recipe", recipe.as_dict()) != recipe.as_dict():
            log(f"note: the recipe differs from the checkpoint's ({state.get('recipe')}); its schedules "
                f"continue from step {step} with the new one")
        if (state.get("num_processes"), state.get("batch_size"), state.get("seed")) != (world, args.batch_size,
                                                                                        args.seed):
            log("note: processes, batch size or seed differ from the checkpoint's; the data order will not "
                "match an uninterrupted run")
            if start_batch:  # another rank split: the epoch's remaining batches are not the same ones
                log(f"note: the checkpoint stopped inside epoch {start_epoch + 1}; that epoch starts over")
                start_batch = 0
        log(f"resuming from {resume} (epoch {start_epoch}" + (f", batch {start_batch} of epoch {start_epoch + 1}"
                                                            if start_batch else "") + f", step {step})")
    elif args.resume:
        log(f"no checkpoint in {ckpt_dir}; starting afresh")
    if note := node_local_note(layout):
        log(note)
    if layout.writer:
        clear_partial(ckpt_dir)  # saves a crash cut short, on each node that writes checkpoints

    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # Keep only the lines of the epochs this run continues from, so metrics.jsonl tells one story.
        old = metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.exists() else []
        kept = [line for line in old if _epoch_of(line) <= start_epoch]
        atomic_write(metrics_path, "".join(line + "\n" for line in kept))
    log_trackers = bool(accelerator.log_with)
    if log_trackers:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
    total_steps = args.epochs * len(train_loader)  # not --max-steps: a cut run must follow the same schedule
    where = "" if accelerator.device.type != "cpu" else (
        " (asked for)" if cpu_asked(args) else " (no NVIDIA GPU on this machine)")
    log(f"training {model_desc(args.model, args.latent_dim)} on {world} x {accelerator.device}{where} "
        f"({accelerator.distributed_type}, mixed precision {accelerator.mixed_precision}, {kernels}), loader "
        f"{args.loader}, {sizes['train']}/{sizes['valid']}/{sizes['test']} train/valid/test images, "
        f"global batch {args.batch_size * world} ({world} x {args.batch_size}), {len(train_loader)} steps per "
        f"epoch, {total_steps} steps in all, recipe {recipe.name} {recipe.as_dict()}")
    return Run(accelerator, log, out, ckpt_dir, layout, recipe, model, accelerator.unwrap_model(model), optimizer,
               loss_fn, manifest, sizes, train_loader, plain_train,
               None if args.loader == "cache" else plain_train, valid_loader, test_loader, start_epoch, step,
               start_batch, resume, total_steps, log_trackers)
