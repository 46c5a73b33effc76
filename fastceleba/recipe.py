"""Training recipes: everything around the notebook's layers that decides how they are trained.

A recipe is the optimizer's learning-rate schedule (peak, linear warm-up, decay), the VAE's KL weight
schedule (beta rising linearly from 0: KL annealing, Bowman et al. 2016) and the scale of the loss that
is backpropagated. Both schedules are pure functions of the global step, so a resumed run continues them
exactly without any scheduler state in the checkpoint. This module never touches data or devices.

- ``notebook``: the seed's own schedule: Adam at 1e-3 from step 0 and constant, beta = 1 throughout,
  the VAE's loss summed over the batch.
- ``default``: see DEFAULT below and the README ("Training recipes") for the measurements behind it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from fastceleba.health import relu_layers

DECAYS = ("constant", "cosine", "linear")
REDUCTIONS = ("sum", "image")
INITS = ("torch", "he", "centred")
MAX_WARMUP_FRACTION, MAX_KL_WARMUP_FRACTION = 0.3, 0.6


@dataclass(frozen=True)
class Recipe:
    name: str
    lr: float = 1e-3              # peak Adam learning rate
    warmup_steps: int = 0         # linear warm-up from lr/warmup_steps to lr over this many steps
    decay: str = "constant"       # after warm-up: constant, or cosine/linear down to lr * final_lr
    final_lr: float = 1.0         # the last step's lr as a fraction of the peak
    beta: float = 1.0             # KL weight once annealed (1: the ELBO)
    kl_warmup_steps: int = 0      # beta rises linearly from beta/kl_warmup_steps to beta over this many steps
    reduction: str = "sum"        # VAE loss backpropagated as the batch "sum" (notebook) or per "image" mean
    init: str = "torch"           # weights: PyTorch's defaults (notebook) or "he": He-normal, zero biases
    clip_grad_norm: float = 0.0   # clip the global gradient norm to this before each step (0: never)
    free_bits: float = 0.0        # VAE: per-latent KL floor in nats (free bits, Kingma et al. 2016; 0: none)
    adam_eps: float = 1e-8        # Adam's epsilon (PyTorch's default 1e-8)

    def warmups(self, total_steps: int) -> tuple[int, int]:
        """(lr warm-up, KL warm-up) in steps for a run of total_steps: the recipe's, but at most
        MAX_WARMUP_FRACTION and MAX_KL_WARMUP_FRACTION of the run, so a short run still trains at full rate
        and reaches the full ELBO."""
        return (min(self.warmup_steps, int(MAX_WARMUP_FRACTION * total_steps)),
                min(self.kl_warmup_steps, int(MAX_KL_WARMUP_FRACTION * total_steps)))

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps."""
        warmup = self.warmups(total_steps)[0]
        if warmup and step < warmup:
            return self.lr * (step + 1) / warmup
        if self.decay == "constant":
            return self.lr
        span = max(1, total_steps - warmup - 1)
        t = min(1.0, max(0.0, (step - warmup) / span))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.decay == "cosine" else 1 - t
        return self.lr * (self.final_lr + (1 - self.final_lr) * shape)

    def beta_at(self, step: int, total_steps: int) -> float:
        """KL weight for step `step` (0-based) of a run of `total_steps` steps."""
        warmup = self.warmups(total_steps)[1]
        if warmup and step < warmup:
            return self.beta * (step + 1) / warmup
        return self.beta

    def as_dict(self) -> dict:
        return asdict(self)


NOTEBOOK = Recipe("notebook")
# Chosen from the seed tables in the README (5,000 synthetic faces, 10 epochs, batch 128, 3 seeds). With
# init "he" 12-34 % of enc_conv1 was dead at step 0 and stayed dead (VAE 22.4 / 17.8 / 21.9 dB at seeds
# 0 / 1 / 2); "centred" starts with 0-3 % dead and gives 22.6 / 20.8 / 22.6 dB: the worst seed +3.0 dB,
# the mean +1.3 dB. Still short of issue 9's targets (seed 1 stalls near the mean image for ~3 epochs and
# ends with 20 % of dec_conv1 dead).
DEFAULT = Recipe("default", lr=2e-3, warmup_steps=100, decay="cosine", final_lr=0.05, kl_warmup_steps=200,
                 reduction="image", init="centred")
RECIPES = {"default": DEFAULT, "notebook": NOTEBOOK}


def initialize(model: nn.Module, init: str) -> nn.Module:
    """Re-initialize a freshly built model in place ("torch": leave PyTorch's defaults).

    "he": every layer followed by a ReLU gets N(0, 2 / fan_in) weights (He et al. 2015), every other layer
    N(0, 1 / fan_in), and all biases 0, so at step 0 each ReLU unit is positive on about half the inputs
    instead of on none for an unlucky negative bias. fan_in counts the inputs that reach one output: for a
    transposed convolution in_channels * k * k / stride^2.

    "centred": "he", then every output unit of a layer followed by a ReLU has its weights shifted to sum to
    zero. The inputs of these layers are all >= 0 (pixels in [0, 1], or ReLU outputs), so with "he" a unit's
    pre-activation is about (sum of its weights) x (input level): a unit whose weights happen to sum
    negative is negative on every image and dead from step 0 (12-34 % of enc_conv1 at seeds 0-2). A
    zero-sum unit responds to contrast, not level, and is positive on part of the inputs.
    """
    if init == "torch":
        return model
    centre = init == "centred"
    relu_inputs = set(map(id, relu_layers(model).values()))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.ConvTranspose2d):
            fan_in = (module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                      / (module.stride[0] * module.stride[1]))
        elif isinstance(module, nn.Linear):
            fan_in = module.in_features
        else:
            continue
        gain = 2.0 if id(module) in relu_inputs else 1.0
        with torch.no_grad():
            module.weight.normal_(0.0, math.sqrt(gain / fan_in))
            if centre and id(module) in relu_inputs:
                # each output unit's weights sum to 0 over its inputs (dims: out first for Conv2d/Linear,
                # second for ConvTranspose2d), rescaled back to He's variance
                out_dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
                w = module.weight.transpose(0, out_dim)
                dims = tuple(range(1, w.dim()))
                n = w[0].numel()
                w.sub_(w.mean(dim=dims, keepdim=True)).mul_(math.sqrt(n / (n - 1)))
            module.bias.zero_()
    return model


def resolve(name: str, **overrides) -> Recipe:
    """The named recipe with the given fields replaced (None values are ignored)."""
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
