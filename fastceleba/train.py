#!/usr/bin/env python
"""Train the seed notebook's autoencoder (--model ae) or VAE (--model vae) on CelebA shards: one Accelerate
loop for one CPU, one GPU, several GPUs or several CPU processes.

    python fastceleba/train.py --data shards --out runs/vae
    accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 fastceleba/train.py --data shards

`python fastceleba/train.py --help` explains every flag, what the run writes and the exit statuses
(fastceleba/train_args.py). The parts: fastceleba/train_setup.py builds the run (device, data, model,
optimizer, resume point), fastceleba/train_loop.py trains one epoch; this file runs the epochs, writes
the checkpoints, evaluates, and writes the outputs. SIGTERM and Ctrl-C stop it after the current step
with a checkpoint that --resume continues from exactly (fastceleba/preemption.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

# `python fastceleba/train.py` puts fastceleba/ itself first on sys.path. Put the repository root there
# instead, so `import fastceleba` works without `pip install -e .` and our module names (metrics,
# pictures, ...) can never shadow installed packages.
if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__":
    # Importing torch (and torch._dynamo, which Adam's first call imports in set_up) makes ~320,000 GC-tracked
    # objects, and the cyclic GC would scan the growing heap again and again: ~0.7 s of a run's start on
    # 2 CPU cores. train() freezes them once set up and turns the GC back on (that also spares the
    # interpreter's exit ~0.5 s of scanning them).
    gc.disable()

import torch
from accelerate.utils import set_seed

from fastceleba import fid, health, pictures
from fastceleba.checkpoints import save_checkpoint, scaler_saved_once
from fastceleba.distributed import peer_lost, release_group
from fastceleba.errors import DataError
from fastceleba.files import write_json
from fastceleba.metrics import evaluate, format_metrics, mean_image
from fastceleba.models import save_pretrained
from fastceleba.preemption import StopSignal, Stopped
from fastceleba.runtime import SetupError, report
from fastceleba.train_args import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, EXIT_PEER_LOST, EXIT_STOPPED,
                                   parse_args)
from fastceleba.train_loop import Diverged, EpochStats, check_step, compute_loss, make_loss_fn, train_one_epoch
from fastceleba.train_setup import Run, set_up

# What other code imports from here: the command line, the whole job, and the loop's parts.
__all__ = ["parse_args", "train", "main", "compute_loss", "make_loss_fn", "train_one_epoch", "EXIT_DIVERGED"]


def release(*loaders: Any) -> None:
    """close() loaders used once in a while: DALI's pipelines keep their device memory until closed, the
    cache its shared host copy; the next iter() sets them up again where needed."""
    for loader in loaders:
        if loader is not None:
            loader.close()


class Evaluator:
    """Valid/test evaluation against the mean training image, computed the first time it is needed."""

    def __init__(self, run: Run, seed: int):
        self.run, self.seed, self.baseline = run, seed, None

    def __call__(self, loader: Any) -> dict:
        run = self.run
        if self.baseline is None:
            self.baseline = mean_image(run.plain_train, run.accelerator)
            release(run.plain_own)
        metrics = evaluate(run.raw, loader, run.accelerator, self.baseline, seed=self.seed)
        release(loader)
        return metrics


def save(args: argparse.Namespace, run: Run, epochs_done: int, step: int, epoch_step: int = 0) -> Path:
    """Checkpoint after global step ``step``: checkpoints/epoch_N when an epoch is complete (epoch_step 0),
    else checkpoints/step_S, ``epoch_step`` batches into epoch epochs_done + 1."""
    with scaler_saved_once(run.accelerator):
        return save_checkpoint(run.accelerator, run.ckpt_dir, {
            "epoch": epochs_done, "step": step, "epoch_step": epoch_step, "model": args.model,
            "latent_dim": args.latent_dim if args.model == "vae" else None, "num_processes": run.world,
            "batch_size": args.batch_size, "seed": args.seed, "loader": args.loader,
            "recipe": run.recipe.as_dict(), "mixed_precision": run.accelerator.mixed_precision},
            writer=run.layout.writer)


def stopped_line(stop: StopSignal | None, epoch: int, step: int, where: Path) -> str:
    by = stop.name if stop is not None and stop.requested else "a signal to another process"
    return f"stopped at epoch {epoch} step {step} by {by}; checkpoint {where}; --resume goes on from there"


def stop_agreed(run: Run, stop: StopSignal | None) -> bool:
    """Between epochs: did any rank get a signal during evaluation or the checkpoint? (every rank alike)"""
    no_nan = torch.zeros((), dtype=torch.int64, device=run.accelerator.device)
    return check_step(run.accelerator, no_nan, stop, 0, run.recipe, None)


def epoch_record(run: Run, epoch: int, stats: EpochStats, complete: bool) -> dict[str, Any]:
    """metrics.jsonl's line for an epoch, before evaluation. images/s leaves out the first step (loader
    start-up, compilation, cuDNN autotuning), reported apart (an epoch of one step has nothing else)."""
    rest = stats.seconds - stats.first_step_seconds
    steady = (stats.images * (stats.steps - 1) / stats.steps / rest if stats.steps > 1 and rest > 0
              else stats.images / stats.seconds)
    last = stats.step - 1
    record: dict[str, Any] = {"epoch": epoch + 1, "step": stats.step, "train_loss": stats.loss,
                              "lr": run.recipe.lr_at(last, run.total_steps),
                              "beta": run.recipe.beta_at(last, run.total_steps), "images_per_s": steady,
                              "first_step_seconds": stats.first_step_seconds, "seconds": stats.seconds,
                              "scaler_skipped_steps": stats.skipped}
    if run.accelerator.scaler is not None:
        record["loss_scale"] = run.accelerator.scaler.get_scale()
    if not complete:
        record["partial"] = True
    return record


def log_epoch(args: argparse.Namespace, run: Run, record: dict, stats: EpochStats) -> None:
    run.log(f"epoch {record['epoch']}/{args.epochs} step {stats.step}: train loss {stats.loss:.5g}, "
            f"{record['images_per_s']:.0f} img/s after a first step of {stats.first_step_seconds:.2f} s"
            + (f", fp16 loss scaler skipped {stats.skipped} of {stats.steps} steps" if stats.skipped else "")
            + (f"; valid {format_metrics(record['valid'])}" if "valid" in record else ""))
    if run.accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if run.log_trackers:
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for k, v in record.get("valid", {}).items():
            flat.update({f"valid/{k}/{n}": x for n, x in v.items()} if isinstance(v, dict) else {f"valid/{k}": v})
        run.accelerator.log(flat, step=stats.step)


def train(args: argparse.Namespace, stop: StopSignal | None = None) -> tuple[torch.nn.Module, dict]:
    """Run the whole job (every rank calls it); returns this rank's trained model (unwrapped) and the summary.

    With ``stop`` (installed by main), a SIGTERM/SIGINT ends the run after the current step on every rank
    with a checkpoint of that step and raises Stopped."""
    run = set_up(args)
    if not gc.isenabled():  # started as a script (the top of this file): its imports and set-up are done
        gc.freeze()
        gc.enable()
    evaluator = Evaluator(run, args.seed)
    step, start, last_good = run.step, run.start_batch, run.resumed_from
    skipped_steps, valid_metrics = 0, {}

    def save_mid_epoch(at_step: int, epoch_step: int) -> None:  # --checkpoint-every-steps
        nonlocal last_good
        last_good = save(args, run, epoch, at_step, epoch_step)

    for epoch in range(run.start_epoch, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        # The VAE's noise is a function of (seed, epoch, rank), so a resumed run redraws the same noise;
        # mid-epoch, the checkpoint gave back the RNG state of its step instead.
        if not start:
            set_seed(args.seed + 1000 * (epoch + 1), device_specific=True)
        run.train_loader.set_epoch(epoch, start)
        stats = train_one_epoch(args, run.accelerator, run.model, run.loss_fn, run.optimizer, run.train_loader,
                                epoch, step, run.recipe, run.total_steps, last_good, start=start, stop=stop,
                                every=args.checkpoint_every_steps, save=save_mid_epoch)
        epoch_step = start + stats.steps
        complete = epoch_step == len(run.train_loader)  # False when --max-steps or a signal cut it
        step, start, skipped_steps = stats.step, 0, skipped_steps + stats.skipped
        if stats.stopped and not complete:
            path = save(args, run, epoch, step, epoch_step)
            raise Stopped(stopped_line(stop, epoch + 1, step, path))
        record = epoch_record(run, epoch, stats, complete)
        last = epoch + 1 == args.epochs or not complete
        if run.valid_loader and args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            record["valid"] = valid_metrics = evaluator(run.valid_loader)
            record["problems"] = health.problems(valid_metrics)
        if complete:
            last_good = save(args, run, epoch + 1, step)
        log_epoch(args, run, record, stats)
        if stats.stopped or (epoch + 1 < args.epochs and stop_agreed(run, stop)):
            raise Stopped(stopped_line(stop, epoch + 1, step, last_good))
    if run.valid_loader and args.eval_every and not valid_metrics:  # e.g. --resume of a finished run
        valid_metrics = evaluator(run.valid_loader)
    return run.raw, finish(args, run, evaluator, step, skipped_steps, valid_metrics)


def sample_quality(args: argparse.Namespace, run: Run) -> dict:
    """FID/KID (or the random-feature stand-ins) on the test split at T = 1; the reason where not computed."""
    features, why = fid.make_features(args.sample_features, args.inception_weights, run.accelerator)
    if features is None:
        run.log(f"note: FID/KID not computed: {why}; pass --inception-weights PATH (torch-fidelity's "
                f"{fid.STANDARD_FILE}) or set {fid.ENV_WEIGHTS}")
        return fid.not_computed(args.sample_features, why)
    quality = fid.sample_quality(run.raw, run.test_loader, run.accelerator, features, seed=args.seed)
    release(run.test_loader)
    return quality


def finish(args: argparse.Namespace, run: Run, evaluator: Evaluator, step: int, skipped_steps: int,
           valid_metrics: dict) -> dict:
    """Test evaluation, the health verdict, pictures, weights and summary.json; returns the summary."""
    acc, log = run.accelerator, run.log
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    summary: dict[str, Any] = {"model": args.model, "latent_dim": args.latent_dim if args.model == "vae" else None,
                               "steps": step, "num_processes": run.world, "device": str(acc.device),
                               "backend": backend, "mixed_precision": acc.mixed_precision,
                               "global_batch_size": args.batch_size * run.world, "deterministic": args.deterministic,
                               "scaler_skipped_steps": skipped_steps, "args": vars(args),
                               "recipe": run.recipe.as_dict(), "valid": valid_metrics}
    if run.test_loader and not args.no_test:
        summary["test"] = evaluator(run.test_loader)
        log(f"test: {format_metrics(summary['test'])}")
        if args.sample_features != "none":
            summary["sample_quality"] = quality = sample_quality(args, run)
            if quality["computed"]:
                log(f"test sample quality: {fid.format_quality(quality)}")
    # The verdict: judged on test when it was evaluated, else on valid.
    judged = "test" if summary.get("test", {}).get("num_samples") else "valid"
    found = health.problems(summary.get(judged, {}))
    summary["health"] = {"split": judged, "collapsed": bool(found), "problems": found,
                         "warning": health.warning_line(found, judged, run.recipe.name) if found else None}
    if found:
        log(summary["health"]["warning"])
    if not args.no_pictures and run.test_loader:
        summary["pictures"] = pictures.write_pictures(args, acc, run.raw, run.test_loader, run.plain_train,
                                                      run.manifest.get("attr_names", []), run.out, log)
        release(run.test_loader, run.plain_own)
    if acc.is_main_process:
        save_pretrained(run.raw, run.out, {"image_size": 64, "crop": args.crop, "steps": step})
        write_json(run.out / "summary.json", summary)
        test = summary.get("test", {})
        done = f"; test PSNR {test['psnr']:.2f} dB" if test.get("num_samples") else ""
        if "sample_quality" in summary:
            done += f", {fid.format_quality(summary['sample_quality'])}"
        log(f"wrote {run.out / 'model.safetensors'} and {run.out / 'summary.json'}{done}")
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopSignal().install()
    try:
        train(args, stop)
    except Stopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr, flush=True)
        release_group()
        return EXIT_STOPPED
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
    finally:
        stop.uninstall()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
