"""train.py's command line: every flag, its checks, and the exit statuses (``EPILOG``).

``parse_args`` is all a caller needs (bench/quality.py and tools/sweep.py build train.py runs with it);
``per_process_batch`` turns --batch-size / --global-batch-size into the images of one process's step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from fastceleba import remote
from fastceleba.loaders import KINDS
from fastceleba.recipe import add_recipe_arguments, check_recipe_arguments
from fastceleba.runtime import SetupError, cpu_asked

DESCRIPTION = """Train the seed notebook's autoencoder (--model ae) or VAE (--model vae) on CelebA shards.

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
attributes.png for the VAE) and checkpoints/epoch_N (the last two) or step_S (mid-epoch: a run stopped by
SIGTERM or Ctrl-C, or --checkpoint-every-steps); --resume continues from the newest, mid-epoch too.
"""

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_STOPPED = 0, 2, 3, 4, 5

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
4 another process of a multi-node run stopped first (its own "error:" line says why), so this one did too;
5 stopped by SIGTERM or SIGINT (Ctrl-C): the current step finished, every process stopped at the same step,
checkpoints/step_S was written and the line says so; --resume goes on from that step exactly. A second
signal (more than 1 s after the first) stops at once, keeping the newest complete checkpoint.
`accelerate launch` forwards the signal and kills its processes 5 s later (30 s with several processes).
A run whose model collapsed (see fastceleba/health.py) still exits 0 but prints one "warning:" line and
records it in summary.json ("health"). Under
`accelerate launch` with several processes each process exits so and the launcher itself exits 1.
"""


def default_loader(cpu: bool = False, data: str = "") -> str:
    """wds for shards at a URL (the one kind that streams); DALI where it is installed and a GPU can decode;
    otherwise the in-memory decoded cache."""
    if remote.is_remote(data):
        return "wds"
    if not cpu and importlib.util.find_spec("nvidia.dali") is not None and torch.cuda.is_available():
        return "dali"
    return "cache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, epilog=EPILOG,
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
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the conv weights and each batch in channels-last memory (NHWC), which oneDNN "
                        "and cuDNN convolve faster: the same layers and numbers to rounding, 1.13-1.17x faster "
                        "eager steps on 2 CPU cores (docs/benchmarks.md); --no-channels-last is PyTorch's default layout, "
                        "the notebook's (default: on)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints (starts afresh if none)")
    p.add_argument("--checkpoint-every-steps", type=int, default=0, metavar="N",
                   help="also write checkpoints/step_S every N optimizer steps inside an epoch, for long epochs "
                        "(0: only after each epoch and when stopped by a signal); only the newest is kept")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); a cut epoch is not checkpointed")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop (pixels) before resizing to 64, e.g. 148; default: the notebook's resize+crop")
    p.add_argument("--flip", action="store_true", help="random horizontal flips of training images")
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker threads/processes per training process (default 2; DALI on a GPU: this "
                        "process's share of the CPU cores, which nvJPEG's host stages use)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate on the valid split every N epochs and after the last (0: never)")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress-bar updates, NaN checks and, with several processes, the check "
                        "for a stop signal (one process checks after every step)")
    p.add_argument("--attr-images", type=int, default=20000,
                   help="training images encoded to build the attribute vectors of attributes.png")
    p.add_argument("--no-test", action="store_true",
                   help="skip the final test evaluation (for model selection, e.g. tools/sweep.py)")
    p.add_argument("--no-pictures", action="store_true", help="write no PNG pictures")
    p.add_argument("--sample-features", choices=("inception", "random-conv", "none"), default="inception",
                   help="after the test evaluation: FID and KID of prior samples (T = 1) and of reconstructions "
                        "against the test images (inception, the default: the standard features, computed only "
                        "with the standard weights, else recorded as null with one note: line); random-conv: "
                        "the same distances in a fixed random conv net's features, named rfd/rkid (NOT FID, no "
                        "weights needed); none: skip (fastceleba/fid.py)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or a .safetensors of it); "
                        "default: $FASTCELEBA_INCEPTION_WEIGHTS, else torch's hub cache, else a download into it "
                        "unless FASTCELEBA_OFFLINE=1 or HF_HUB_OFFLINE=1")
    add_recipe_arguments(p)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "global_batch_size", "latent_dim", "log_every", "workers", "eval_every",
                 "attr_images", "checkpoint_every_steps"):
        if getattr(args, name) is None:
            continue
        minimum = 0 if name in ("workers", "eval_every", "attr_images", "checkpoint_every_steps") else 1
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}")
    if args.inception_weights and not os.path.isfile(os.path.expanduser(args.inception_weights)):
        p.error(f"--inception-weights {args.inception_weights}: no such file")
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
