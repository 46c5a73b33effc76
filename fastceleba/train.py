#!/usr/bin/env python
"""Train the seed notebook's autoencoder (--model ae) or VAE (--model vae) on CelebA shards.

The same script runs on one CPU, one GPU, several GPUs or several CPU processes, through Hugging Face
Accelerate:

    python fastceleba/train.py --data shards --out runs/vae                       # one device, fp32
    accelerate launch --mixed_precision bf16 fastceleba/train.py --data shards    # bf16 autocast
    accelerate launch --multi_gpu --num_processes 4 fastceleba/train.py --data shards

The default recipe (--recipe default) trains the notebook's layers with a learning-rate warm-up and
cosine decay, KL annealing, a per-image loss, a zero-sum He init and, for the VAE, a small initial
posterior variance, a mean-colour output bias and gradient centralization; --recipe notebook is the
seed's exact schedule (Adam 1e-3 constant, beta 1, the VAE's loss summed over the batch). See
fastceleba/recipe.py.

It writes into --out: metrics.jsonl (one JSON line per epoch: train loss, lr, beta, images/s after the
first step and that step's seconds apart, steps fp16's loss scaler skipped, valid metrics and model
health), summary.json (final test metrics beside the mean-image baseline, the health verdict, the
process-group backend, the global batch), model.safetensors + config.json
(fastceleba.models.load_pretrained reads them), reconstructions.png (+ samples.png, interpolation.png,
attributes.png for the VAE) and checkpoints/epoch_N (the last two; --resume continues from the newest).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

# `python fastceleba/train.py` puts fastceleba/ itself first on sys.path. Put the repository root there
# instead, so `import fastceleba` works without `pip install -e .` and our module names (metrics,
# pictures, ...) can never shadow installed packages.
if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from fastceleba import health, pictures, remote
from fastceleba.checkpoints import (check_resume_point, clear_partial, find_resume,
                                    load_resume_state, model_desc, register_weight_hooks,
                                    save_checkpoint, scaler_saved_once)
from fastceleba.distributed import (agree, from_rank0, node_local_note, out_layout, peer_lost, release_group,
                                    same_data)
from fastceleba.errors import DataError
from fastceleba.files import atomic_write, write_json
from fastceleba.loaders import KINDS, make_loader
from fastceleba.metrics import evaluate, mean_image
from fastceleba.models import ae_loss, build_model, save_pretrained, vae_loss
from fastceleba.recipe import (Recipe, add_recipe_arguments, centralize_gradients, check_recipe_arguments,
                               initialize, recipe_from_args, set_output_bias)
from fastceleba.runtime import SetupError, cpu_asked, main_print, make_accelerator, report, set_backends

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST = 0, 2, 3, 4

EPILOG = """\
mixed precision and devices are Accelerate's: `accelerate launch --mixed_precision bf16 ...` (or
`accelerate config`); several processes on a machine without a GPU train together over gloo.
Where NVIDIA GPUs exist but torch cannot use them (e.g. a driver older than the CUDA build needs)
the run stops (status 2) unless --cpu asks for the CPU; a machine without GPUs trains on the CPU.
--batch-size is per process: N processes take N times fewer, N times larger steps at the same --lr;
--global-batch-size keeps the optimisation of one process whatever N.
On a CPU, plain `python` uses all cores; `accelerate launch` sets OMP_NUM_THREADS=1 unless given
`--cpu` or `--num_cpu_threads_per_process N`.

exit status: 0 done; 2 bad input or usage (missing shards, a checkpoint of another model, bad flags);
3 the loss became NaN/inf (training diverged; lower --lr; the last good checkpoint is kept);
4 another process of a multi-node run stopped first (its own "error:" line says why), so this one did too.
A run whose model collapsed (see fastceleba/health.py) still exits 0 but prints one "warning:" line and
records it in summary.json ("health"). Under
`accelerate launch` with several processes each process exits so and the launcher itself exits 1.
"""


class Diverged(RuntimeError):
    """The training loss became NaN or inf (found through a reduction: every rank raises it alike)."""
    agreed = True  # every rank raises it: rank 0 alone prints it


def default_loader(cpu: bool = False, data: str = "") -> str:
    """wds for shards at a URL (the one kind that streams); DALI where it is installed and a GPU can decode;
    otherwise the in-memory decoded cache."""
    if remote.is_remote(data):
        return "wds"
    if not cpu and importlib.util.find_spec("nvidia.dali") is not None and torch.cuda.is_available():
        return "dali"
    return "cache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("ae", "vae"), default="vae",
                   help="the notebook's autoencoder or its VAE (default: vae, the notebook's final model and the "
                        "one that can also generate faces)")
    p.add_argument("--data", required=True,
                   help="shard directory written by tools/shard.py (holds manifest.json), or the shards at an "
                        "http(s):// URL or a 'pipe:CMD {name}' command (streamed; --loader wds only)")
    p.add_argument("--loader", choices=KINDS, default=None,
                   help=f"data loader kind (default here: {default_loader()}; dali where a GPU exists, else "
                        "cache; wds for a URL)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split (notebook: 5)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=None,
                       help="images per step on each process (default 128, the notebook's); N processes make "
                            "a global batch of N x this, and N times fewer steps per epoch at the same --lr")
    batch.add_argument("--global-batch-size", type=int, default=None,
                       help="images per optimizer step over all processes, divided among them (must be a "
                            "multiple of the number of processes): keeps the optimisation of a 1-process run "
                            "with --batch-size of this value whatever the number of GPUs")
    p.add_argument("--latent-dim", type=int, default=80, help="VAE latent size (notebook: 80); the AE has none")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and the VAE's noise")
    p.add_argument("--cpu", action="store_true",
                   help="train on the CPU even where GPUs exist (also ACCELERATE_USE_CPU=1 or `accelerate launch "
                        "--cpu`); without it, GPUs that torch cannot use (e.g. a driver too old) stop the run")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (torch.use_deterministic_algorithms, cudnn.deterministic, "
                        "CUBLAS_WORKSPACE_CONFIG) so a GPU run resumes bit for bit; slower on a GPU, and "
                        "turns off cudnn.benchmark and TF32 (on by default on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="run model and loss through torch.compile as one graph (the first steps compile)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints (starts afresh if none)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); a cut epoch is not checkpointed")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop (pixels) before resizing to 64, e.g. 148; default: the notebook's resize+crop")
    p.add_argument("--flip", action="store_true", help="random horizontal flips of training images")
    p.add_argument("--workers", type=int, default=2, help="loader worker threads/processes per training process")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate on the valid split every N epochs and after the last (0: never)")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress-bar updates and NaN checks")
    p.add_argument("--attr-images", type=int, default=20000,
                   help="training images encoded to build the attribute vectors of attributes.png")
    p.add_argument("--no-test", action="store_true",
                   help="skip the final test evaluation (for model selection, e.g. tools/sweep.py)")
    p.add_argument("--no-pictures", action="store_true", help="write no PNG pictures")
    add_recipe_arguments(p)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "global_batch_size", "latent_dim", "log_every", "workers", "eval_every",
                 "attr_images"):
        if getattr(args, name) is None:
            continue
        minimum = 0 if name in ("workers", "eval_every", "attr_images") else 1
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    check_recipe_arguments(p, args)
    args.out = args.out or os.path.join("runs", args.model)
    args.loader = args.loader or default_loader(cpu_asked(args), args.data)
    return args


def per_process_batch(args: argparse.Namespace, world: int) -> int:
    """Images per step on each process: --batch-size, or --global-batch-size / processes."""
    if args.global_batch_size is None:
        return args.batch_size or 128
    if args.global_batch_size % world:
        raise SetupError(f"--global-batch-size {args.global_batch_size} is not a multiple of the {world} "
                         f"processes; use e.g. {max(world, args.global_batch_size // world * world)}")
    return args.global_batch_size // world


# ----------------------------------------------------------------------------------------------- small helpers
def split_size(manifest: dict, split: str) -> int:
    return int(manifest.get("splits", {}).get(split, {}).get("num_samples", 0))


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


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line (inf for a line a crash cut short, so it is dropped)."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ------------------------------------------------------------------------------------------------------- loop
def check_finite(accelerator: Accelerator, bad_steps: torch.Tensor, step: int, recipe: Recipe,
                 last_good: Path | None) -> None:
    """Raise Diverged (on every rank alike) once any rank has seen a NaN/inf loss."""
    bad = bad_steps.clone()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        raise Diverged(f"the loss became NaN/inf by step {step}: training diverged; lower --lr "
                       f"(its peak is {recipe.lr:g}); {kept}")


class EpochStats(NamedTuple):
    step: int                  # global step after the epoch
    steps: int                 # steps taken in this epoch
    loss: float                # mean shown loss over steps and ranks
    images: int                # images over all ranks
    seconds: float             # the whole epoch
    first_step_seconds: float  # the first step alone: loader start-up, compilation, cuDNN autotuning
    skipped: int               # steps fp16's GradScaler skipped (inf/NaN gradients); 0 without a scaler


def train_one_epoch(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, loss_fn: Any,
                    optimizer: torch.optim.Optimizer, loader: Any, epoch: int, step: int, recipe: Recipe,
                    total_steps: int, last_good: Path | None) -> EpochStats:
    """One pass over the training loader (see EpochStats).

    Before each step the recipe sets the learning rate and the KL weight for that global step. A step the
    GradScaler skips still counts as a step: the schedules are functions of the step, as in a run without it.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad_steps = torch.zeros((), dtype=torch.int64, device=device)
    steps, images, skipped, first = 0, 0, 0, 0.0
    start = time.perf_counter()
    # `with`: the bar is cleared before an exception (Diverged) prints its message
    with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
              dynamic_ncols=True, disable=not accelerator.is_main_process) as bar:
        for batch in loader:
            x = batch["image"]
            if step == 0 and recipe.output_bias == "mean":  # a fresh run's first batch, over all ranks
                set_output_bias(model, accelerator.reduce(x.float().mean((0, 2, 3)), reduction="mean"))
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(step, total_steps)
            beta = torch.tensor(recipe.beta_at(step, total_steps), device=x.device)
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
                first = time.perf_counter() - start
            done = args.max_steps is not None and step >= args.max_steps
            if steps % args.log_every == 0 or steps == len(loader) or done:
                check_finite(accelerator, bad_steps, step, recipe, last_good)
                bar.set_postfix(loss=f"{shown.item():.4g}", img_s=f"{images / (time.perf_counter() - start):.0f}")
            bar.update()
            if done:
                break
    check_finite(accelerator, bad_steps, step, recipe, last_good)
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, torch.tensor(float(steps), dtype=torch.float64, device=device)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return EpochStats(step, steps, float(totals[0] / totals[1]) if steps else float("nan"), images, seconds,
                      first, skipped)


def format_metrics(m: dict) -> str:
    if not m.get("num_samples"):
        return "no images"
    text = f"mse {m['mse']:.5f} psnr {m['psnr']:.2f} dB r2 {m['r2']:.3f}"
    if "neg_elbo" in m:
        text += f" -elbo {m['neg_elbo']:.1f} kld {m['kld']:.1f}"
    text += f" (mean-image baseline: mse {m['baseline_mse']:.5f} psnr {m['baseline_psnr']:.2f} dB)"
    if "active_units" in m:
        text += f"; active latents {m['active_units']}/{m['latent_dim']}"
    if m.get("dead_fraction"):
        layer, frac = max(m["dead_fraction"].items(), key=lambda kv: kv[1])
        text += f"; dead units ≤ {frac:.0%} ({layer})"
    return text


def release(*loaders: Any) -> None:
    """close() loaders used once in a while: DALI's pipelines keep their device memory until closed, the
    cache its shared host copy; the next iter() sets them up again where needed."""
    for loader in loaders:
        if loader is not None:
            loader.close()


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Run the whole job (every rank calls it); returns this rank's trained model (unwrapped) and the summary."""
    data, out = remote.location(args.data), Path(args.out)  # a Path, or a URL / pipe: (wds streams it)
    accelerator = make_accelerator(args, out)
    log = main_print(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    args.batch_size = per_process_batch(args, world)
    kernels = set_backends(args.deterministic, accelerator.device.type == "cuda")

    ckpt_dir = out / "checkpoints"
    # Before the first collective of training, every rank's set-up is agreed (fastceleba/distributed.py):
    # a DataError on one rank stops all of them with the same line instead of leaving them waiting.
    layout = out_layout(rank, world, accelerator.is_local_main_process, ckpt_dir)
    accelerator.project_configuration.save_on_each_node = layout.per_node

    recipe = recipe_from_args(args)
    set_seed(args.seed)  # the same initial weights on every rank
    model = initialize(build_model(args.model, args.latent_dim), recipe.init, recipe.logvar_bias)

    def loader(split: str, **kw: Any) -> Any:
        kw.setdefault("batch_size", args.batch_size)
        return make_loader(args.loader, str(data), split, device=accelerator.device, seed=args.seed, rank=rank,
                           world_size=world, num_workers=args.workers, crop=args.crop, **kw)

    def set_up() -> tuple:
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

    def decide_resume() -> tuple[int, dict] | None:  # rank 0 decides; the others learn it through agree
        if rank != 0:
            return None
        found, state = find_resume(ckpt_dir, args.resume, args.model, args.latent_dim)
        return None if state is None else (state["epoch"], state)

    mine, manifest, sizes, train_loader, plain_train, valid_loader, test_loader = agree(
        rank, world, lambda: (decide_resume(), *set_up()))
    same_data(rank, world, manifest, data / "manifest.json")
    chosen = from_rank0(mine, world)
    resume = agree(rank, world, lambda: check_resume_point(ckpt_dir, chosen, layout.writer))
    state = None if chosen is None else chosen[1]
    plain_own = None if args.loader == "cache" else plain_train  # a view holds nothing to release

    # the recipe sets lr before every step
    adam = {"betas": (0.9, recipe.adam_beta2), "eps": recipe.adam_eps}
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, **adam)
    model, optimizer = accelerator.prepare(model, optimizer)  # loaders are sharded already: never prepared
    raw = accelerator.unwrap_model(model)
    loss_fn = make_loss_fn(model, args.model, recipe.reduction, args.compile, recipe.free_bits)
    register_weight_hooks(accelerator)

    start_epoch, step = 0, 0
    if state is not None:
        # weights via our hook; optimizer and RNG with weights_only=True. A different number of processes
        # resumes too: the weights and Adam state are whole in every checkpoint, each rank loads
        # random_states_<rank>.pkl if there is one, and train.py re-seeds every epoch anyway.
        agree(rank, world, lambda: load_resume_state(accelerator, resume, state, log))
        start_epoch, step = state["epoch"], state["step"]
        for group in optimizer.param_groups:  # loading restored the checkpoint's betas and eps: the recipe's apply
            group.update(adam)
        if state.get("recipe", recipe.as_dict()) != recipe.as_dict():
            log(f"note: the recipe differs from the checkpoint's ({state.get('recipe')}); its schedules "
                f"continue from step {step} with the new one")
        if (state.get("num_processes"), state.get("batch_size"), state.get("seed")) != (world, args.batch_size,
                                                                                        args.seed):
            log("note: processes, batch size or seed differ from the checkpoint's; the data order will not "
                "match an uninterrupted run")
        log(f"resuming from {resume} (epoch {start_epoch}, step {step})")
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
    if log_trackers := accelerator.log_with:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
    precision = accelerator.mixed_precision
    total_steps = args.epochs * len(train_loader)  # not --max-steps: a cut run must follow the same schedule
    where = "" if accelerator.device.type != "cpu" else (
        " (asked for)" if cpu_asked(args) else " (no NVIDIA GPU on this machine)")
    log(f"training {model_desc(args.model, args.latent_dim)} on {world} x {accelerator.device}{where} "
        f"({accelerator.distributed_type}, mixed precision {precision}, {kernels}), loader {args.loader}, "
        f"{sizes['train']}/{sizes['valid']}/{sizes['test']} train/valid/test images, "
        f"global batch {args.batch_size * world} ({world} x {args.batch_size}), {len(train_loader)} steps per "
        f"epoch, {total_steps} steps in all, recipe {recipe.name} {recipe.as_dict()}")

    baseline = None
    last_good = resume
    skipped_steps = 0
    valid_metrics: dict = {}
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        # The VAE's noise is a function of (seed, epoch, rank), so a resumed run redraws the same noise.
        set_seed(args.seed + 1000 * (epoch + 1), device_specific=True)
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(args, accelerator, model, loss_fn, optimizer, train_loader, epoch, step, recipe,
                                total_steps, last_good)
        step, steps, train_loss, images, seconds = stats[:5]
        skipped_steps += stats.skipped
        complete = steps == len(train_loader)  # False when --max-steps cut the epoch
        # images/s leaves out the first step (loader start-up, compilation, cuDNN autotuning): reported apart
        # (an epoch of one step has nothing else to count).
        rest = seconds - stats.first_step_seconds
        steady = images * (steps - 1) / steps / rest if steps > 1 and rest > 0 else images / seconds
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": train_loss,
                                  "lr": recipe.lr_at(step - 1, total_steps), "beta": recipe.beta_at(step - 1, total_steps),
                                  "images_per_s": steady, "first_step_seconds": stats.first_step_seconds,
                                  "seconds": seconds, "scaler_skipped_steps": stats.skipped}
        if accelerator.scaler is not None:
            record["loss_scale"] = accelerator.scaler.get_scale()
        if not complete:
            record["partial"] = True
        last = epoch + 1 == args.epochs or not complete
        if valid_loader and args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            if baseline is None:
                baseline = mean_image(plain_train, accelerator)
                release(plain_own)
            record["valid"] = valid_metrics = evaluate(raw, valid_loader, accelerator, baseline, seed=args.seed)
            release(valid_loader)
            record["problems"] = health.problems(valid_metrics)
        if complete:
            with scaler_saved_once(accelerator):
                last_good = save_checkpoint(accelerator, ckpt_dir, {
                    "epoch": epoch + 1, "step": step, "model": args.model,
                    "latent_dim": args.latent_dim if args.model == "vae" else None, "num_processes": world,
                    "batch_size": args.batch_size, "seed": args.seed, "loader": args.loader,
                    "recipe": recipe.as_dict(), "mixed_precision": precision}, writer=layout.writer)
        log(f"epoch {epoch + 1}/{args.epochs} step {step}: train loss {train_loss:.5g}, "
            f"{record['images_per_s']:.0f} img/s after a first step of {stats.first_step_seconds:.2f} s"
            + (f", fp16 loss scaler skipped {stats.skipped} of {steps} steps" if stats.skipped else "")
            + (f"; valid {format_metrics(record['valid'])}" if "valid" in record else ""))
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if log_trackers:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for k, v in record.get("valid", {}).items():
                flat.update({f"valid/{k}/{n}": x for n, x in v.items()} if isinstance(v, dict) else {f"valid/{k}": v})
            accelerator.log(flat, step=step)

    if valid_loader and args.eval_every and not valid_metrics:  # e.g. --resume of a finished run
        if baseline is None:
            baseline = mean_image(plain_train, accelerator)
            release(plain_own)
        valid_metrics = evaluate(raw, valid_loader, accelerator, baseline, seed=args.seed)
        release(valid_loader)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    summary: dict[str, Any] = {"model": args.model, "latent_dim": args.latent_dim if args.model == "vae" else None,
                               "steps": step, "num_processes": world, "device": str(accelerator.device),
                               "backend": backend, "mixed_precision": precision,
                               "global_batch_size": args.batch_size * world, "deterministic": args.deterministic,
                               "scaler_skipped_steps": skipped_steps, "args": vars(args),
                               "recipe": recipe.as_dict(), "valid": valid_metrics}
    if test_loader and not args.no_test:
        if baseline is None:
            baseline = mean_image(plain_train, accelerator)
            release(plain_own)
        summary["test"] = evaluate(raw, test_loader, accelerator, baseline, seed=args.seed)
        release(test_loader)
        log(f"test: {format_metrics(summary['test'])}")
    # The verdict: judged on test when it was evaluated, else on valid.
    judged = "test" if summary.get("test", {}).get("num_samples") else "valid"
    found = health.problems(summary.get(judged, {}))
    summary["health"] = {"split": judged, "collapsed": bool(found), "problems": found,
                         "warning": health.warning_line(found, judged, recipe.name) if found else None}
    if found:
        log(summary["health"]["warning"])
    if not args.no_pictures and test_loader:
        summary["pictures"] = pictures.write_pictures(args, accelerator, raw, test_loader, plain_train,
                                                      manifest.get("attr_names", []), out, log)
        release(test_loader, plain_own)
    if accelerator.is_main_process:
        save_pretrained(raw, out, {"image_size": 64, "crop": args.crop, "steps": step})
        write_json(out / "summary.json", summary)
        log(f"wrote {out / 'model.safetensors'} and {out / 'summary.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return raw, summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (DataError, SetupError) as e:
        report(e)
        release_group()
        return EXIT_BAD_INPUT
    except Diverged as e:
        report(e)
        release_group()
        return EXIT_DIVERGED
    except RuntimeError as e:  # a collective broke: another process stopped (or a bug, raised as such)
        if (line := peer_lost(e)) is None:
            raise
        report(RuntimeError(line))
        return EXIT_PEER_LOST  # the group is broken: tearing it down could block
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
