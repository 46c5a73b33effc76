"""The machine a training run runs on: which device (and why not a GPU), the kernels' settings,
Accelerate's set-up, and saying things once.

* ``make_accelerator``: the CPU only when asked (``--cpu``, ``ACCELERATE_USE_CPU``) or when the
  machine has no NVIDIA GPU at all; ``SetupError`` when it has GPUs that torch cannot use (a driver
  too old for this CUDA build), instead of eight processes training on the CPU without a word.
* ``set_backends``: deterministic kernels without TF32, or on CUDA cuDNN's autotuner and TF32.
* ``main_print`` / ``report``: one line per event, from rank 0, however many nodes.

Nothing here reads data or trains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, parse_flag_from_env


class SetupError(RuntimeError):
    """Flags that do not fit this machine or launch (exit 2); every rank decides it alike."""
    agreed = True


NVIDIA_SIGNS = ("/proc/driver/nvidia/version", "/dev/nvidia0")
# The oldest driver branch each CUDA major version's wheels run on (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {13: "R580", 12: "R525", 11: "R450"}


def nvidia_gpus(paths: tuple[str, ...] = NVIDIA_SIGNS, smi: str = "nvidia-smi") -> str | None:
    """The first sign of NVIDIA GPU hardware on this machine (a driver file, a device node, or a GPU
    listed by ``smi -L``), or None when there is none."""
    for path in paths:
        if os.path.exists(path):
            return path
    exe = shutil.which(smi)
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"`{smi} -L`: {gpus[0].strip()}" + (f" (+{len(gpus) - 1})" if len(gpus) > 1 else "")
    return None


def cuda_problem(cpu_asked: bool, cuda_available: bool, gpus: str | None) -> str | None:
    """Why training must not start (GPUs present but unusable by torch, and the CPU not asked for), or None."""
    if cpu_asked or cuda_available or not gpus:
        return None
    build = torch.version.cuda
    if build is None:
        need = f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    else:
        major = int(build.split(".")[0])
        driver = MIN_DRIVER.get(major, "a recent")
        need = (f"torch {torch.__version__} is built for CUDA {build} and needs an NVIDIA driver {driver} "
                f"or newer (check `nvidia-smi`; update the driver, or install a torch wheel for an older CUDA)")
    return (f"NVIDIA GPUs are present ({gpus}) but torch cannot use them: {need}; "
            f"to train on the CPU anyway pass --cpu (or `accelerate launch --cpu`)")


def cpu_asked(args: argparse.Namespace) -> bool:
    """--cpu, or Accelerate's ACCELERATE_USE_CPU (`accelerate launch --cpu`, `accelerate config`)."""
    return bool(args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def set_backends(deterministic: bool, cuda: bool) -> str:
    """Deterministic kernels in full fp32 (--deterministic: TF32 off for matmuls and convolutions), or
    on CUDA the fast ones: cuDNN's autotuner and TF32 matmuls/convolutions. Returns what was set, for
    the start line."""
    if deterministic:
        # cuBLAS needs this before its first handle; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # TF32 rounds inputs to 10 mantissa bits; cuDNN's is on by default and deterministic=True
        # does not clear it, so a deterministic run would still convolve in TF32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return "deterministic kernels, no TF32"
    if cuda:
        torch.backends.cudnn.benchmark = True  # batches have one shape: the autotuner pays once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return "cudnn.benchmark, TF32"
    return "default kernels"


def make_accelerator(args: argparse.Namespace, out: Path) -> Accelerator:
    """The CPU only when asked (--cpu, ACCELERATE_USE_CPU) or when the machine has no NVIDIA GPU at all;
    SetupError when it has GPUs that torch cannot use (e.g. a driver too old for this CUDA build)."""
    asked, cuda = cpu_asked(args), torch.cuda.is_available()
    if not asked and not cuda and (problem := cuda_problem(False, False, nvidia_gpus(NVIDIA_SIGNS))):
        raise SetupError(problem)
    # Without CUDA, `accelerate launch --multi_gpu --num_processes N` would start N processes that each
    # train alone (DistributedType.NO); cpu=True makes them one gloo process group.
    log_with = "tensorboard" if is_tensorboard_available() else None
    return Accelerator(cpu=asked or not cuda, log_with=log_with, project_dir=str(out))


def main_print(accelerator: Accelerator):
    """print, on the main process only: one line per event however many nodes (accelerator.print prints
    once per node)."""
    def log(*args: Any) -> None:
        if accelerator.is_main_process:
            print(*args, flush=True)
    return log


def report(error: Exception) -> None:
    """One "error:" line. An error every rank raises alike is printed by rank 0 only: Diverged and
    SetupError (``agreed``: every rank decides them alike) and distributed.AgreedError (``quiet`` on the
    other ranks); any other (e.g. a DataError met mid-epoch by one rank) by every rank that meets it,
    since the others may never learn of it."""
    agreed_elsewhere = getattr(error, "agreed", False) and int(os.environ.get("RANK", "0")) != 0
    if not (getattr(error, "quiet", False) or agreed_elsewhere):
        print(f"error: {error}", file=sys.stderr, flush=True)
