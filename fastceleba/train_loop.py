"""One epoch of training: the notebook's losses, the optimizer steps, and the checks between them.

``train_one_epoch`` runs the steps of one pass over the training loader; before each, the recipe sets the
learning rate and the KL weight of that global step. Every ``--log-every`` steps (and at the end) the
ranks agree, in one reduction, on two things: whether any has seen a NaN/inf loss (``Diverged`` on all
of them alike) and whether any was asked to stop by a signal (fastceleba/preemption.py; then the epoch
ends after that step on every rank). A single process checks for a signal after every step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from tqdm import tqdm

from fastceleba.models import ae_loss, vae_loss
from fastceleba.preemption import StopSignal
from fastceleba.recipe import Recipe, centralize_gradients, set_output_bias


class Diverged(RuntimeError):
    """The training loss became NaN or inf (found through a reduction: every rank raises it alike)."""
    agreed = True  # every rank raises it: rank 0 alone prints it


def compute_loss(model: torch.nn.Module, x: torch.Tensor, kind: str, beta: torch.Tensor | float,
                 reduction: str = "sum", free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, loss to report): the notebook's objectives.

    AE: mean squared error (nn.MSELoss). VAE: squared error + beta * KLD per image, backpropagated as
    the batch sum (reduction "sum", the notebook) or the batch mean (reduction "image": the same objective
    divided by the batch size, so gradients stay ~128x smaller and fit fp16); reported per image either
    way (the notebook printed loss / len(img)). free_bits > 0 (VAE): each latent's KL, averaged over the
    batch, is backpropagated as max(KL, free_bits) nats (free bits, Kingma et al. 2016); the loss reported
    is the unchanged one.
    """
    if kind == "ae":
        loss = ae_loss(model(x), x)
        return loss, loss
    recon, mu, logvar = model(x)
    total, mse, _ = vae_loss(recon, x, mu, logvar, beta)
    per_image = total / x.shape[0]
    if free_bits > 0:
        kl = -0.5 * (1 + logvar.float() - mu.float().pow(2) - logvar.float().exp()).mean(0)  # per latent
        total = mse + beta * torch.clamp(kl, min=free_bits).sum() * x.shape[0]
    return (total / x.shape[0] if reduction == "image" else total), per_image


def make_loss_fn(model: torch.nn.Module, kind: str, reduction: str = "sum", compile: bool = False,
                 free_bits: float = 0.0):
    """(x, beta) -> compute_loss(model, x, kind, beta, reduction), beta a 0-d tensor (so a changing KL weight
    never recompiles); with compile=True, model and loss go through torch.compile together.

    On one process that is one graph, so the loss and its backward fuse with the decoder (on 2 CPU cores:
    1.2-1.5x eager, against 1.1-1.3x when compiling the model alone). Under DDP (several processes) Dynamo
    breaks the graph at the DDP module's forward (torch 2.14, 2 CPU processes: 2 graphs, 2 graph breaks;
    DDPOptimizer also splits the model at gradient buckets so all-reduces overlap the backward): the model
    and the loss compile as separate graphs and nothing fuses across the boundary (docs/gpus.md has
    both measured). Either way the training loader keeps drop_last=True: a smaller last batch would
    recompile."""
    def loss_fn(x: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compute_loss(model, x, kind, beta, reduction, free_bits)

    return torch.compile(loss_fn) if compile else loss_fn


def check_step(accelerator: Accelerator, bad_steps: torch.Tensor, stop: StopSignal | None, step: int,
               recipe: Recipe, last_good: Path | None) -> bool:
    """Raise Diverged (on every rank alike) once any rank has seen a NaN/inf loss; True once any rank
    was asked to stop. One reduction for both, at the points where the loss is read anyway."""
    asked = int(stop is not None and stop.requested)
    flags = torch.stack([bad_steps, torch.full_like(bad_steps, asked)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, asked = flags.tolist()
    if bad > 0:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        raise Diverged(f"the loss became NaN/inf by step {step}: training diverged; lower --lr "
                       f"(its peak is {recipe.lr:g}); {kept}")
    return asked > 0


class EpochStats(NamedTuple):
    step: int                  # global step after the epoch
    steps: int                 # steps taken in this epoch (by this call: a resumed epoch counts from its start)
    loss: float                # mean shown loss over steps and ranks
    images: int                # images over all ranks
    seconds: float             # the whole epoch
    first_step_seconds: float  # the first step alone: loader start-up, compilation, cuDNN autotuning
    skipped: int               # steps fp16's GradScaler skipped (inf/NaN gradients); 0 without a scaler
    stopped: bool = False      # a stop signal ended the epoch after `step` (every rank alike)


def train_one_epoch(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, loss_fn: Any,
                    optimizer: torch.optim.Optimizer, loader: Any, epoch: int, step: int, recipe: Recipe,
                    total_steps: int, last_good: Path | None, start: int = 0,
                    stop: StopSignal | None = None, every: int = 0, save: Any = None) -> EpochStats:
    """One pass over the training loader from its batch ``start`` (see EpochStats).

    A step the GradScaler skips still counts as a step: the schedules are functions of the step, as in a
    run without it. ``save(step, epoch_step)``, when given, writes a step checkpoint every ``every`` steps.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad_steps = torch.zeros((), dtype=torch.int64, device=device)
    # The KL weight lives on the device and is refilled each step: fill_ is a kernel argument, where
    # torch.tensor(beta, device=...) would be a pageable copy that waits for the GPU every step.
    beta = torch.zeros((), device=device)
    todo = len(loader) - start
    steps, images, skipped, first, stopped = 0, 0, 0, 0.0, False
    one_process = accelerator.num_processes == 1
    begin = time.perf_counter()
    # `with`: the bar is cleared before an exception (Diverged) prints its message
    with tqdm(total=len(loader), initial=start, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
              leave=False, dynamic_ncols=True, disable=not accelerator.is_main_process) as bar:
        for batch in loader:
            x = batch["image"]
            if args.channels_last:  # the weights' layout (train_setup.py): one copy, then no reorders
                x = x.contiguous(memory_format=torch.channels_last)
            if step == 0 and recipe.output_bias == "mean":  # a fresh run's first batch, over all ranks
                set_output_bias(model, accelerator.reduce(x.float().mean((0, 2, 3)), reduction="mean"))
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(step, total_steps)
            beta.fill_(recipe.beta_at(step, total_steps))
            loss, shown = loss_fn(x, beta)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if recipe.grad_centralization:
                centralize_gradients(model)
            if recipe.clip_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            optimizer.step()
            # Gradients are all-reduced first, so every rank skips the same steps.
            skipped += accelerator.optimizer_step_was_skipped
            shown = shown.detach()
            loss_sum += shown
            bad_steps += (~torch.isfinite(shown)).long()
            steps, step = steps + 1, step + 1
            images += x.shape[0] * accelerator.num_processes
            if steps == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - begin
            done = args.max_steps is not None and step >= args.max_steps
            signalled = one_process and stop is not None and stop.requested
            if steps % args.log_every == 0 or steps == todo or done or signalled:
                stopped = check_step(accelerator, bad_steps, stop, step, recipe, last_good)
                bar.set_postfix(loss=f"{shown.item():.4g}", img_s=f"{images / (time.perf_counter() - begin):.0f}")
            bar.update()
            if done or stopped:
                break
            if save is not None and every and step % every == 0 and steps < todo:
                save(step, start + steps)
    stopped = check_step(accelerator, bad_steps, stop, step, recipe, last_good) or stopped
    seconds = time.perf_counter() - begin
    totals = torch.stack([loss_sum, torch.tensor(float(steps), dtype=torch.float64, device=device)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return EpochStats(step, steps, float(totals[0] / totals[1]) if steps else float("nan"), images, seconds,
                      first, skipped, stopped)
