"""Training recipes: everything around the notebook's layers that decides how they are trained.

A recipe is the optimizer's learning-rate schedule (peak, linear warm-up, decay), the VAE's KL weight
schedule (beta rising linearly from 0: KL annealing, Bowman et al. 2016), the scale of the loss that
is backpropagated, the initial weights and the gradients' centring. Both schedules are pure functions of
the global step, so a resumed run continues them exactly without any scheduler state in the checkpoint.
This module never reads data (set_output_bias is handed the first batch's mean colour) or picks devices.

- ``notebook``: the seed's own schedule: Adam at 1e-3 from step 0 and constant, beta = 1 throughout,
  the VAE's loss summed over the batch.
- ``default``: see DEFAULT_VAE and DEFAULT_AE below, and docs/recipes.md for the
  measurements behind them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from fastceleba.health import relu_layers
from fastceleba.models import VAE, _unwrap

DECAYS = ("constant", "cosine", "linear")
REDUCTIONS = ("sum", "image")
INITS = ("torch", "he", "centred")
OUTPUT_BIASES = ("init", "mean")
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
    init: str = "torch"           # weights: PyTorch's defaults (notebook), "he" or "centred" (see initialize)
    clip_grad_norm: float = 0.0   # clip the global gradient norm to this before each step (0: never)
    free_bits: float = 0.0        # VAE: per-latent KL floor in nats (free bits, Kingma et al. 2016; 0: none)
    adam_eps: float = 1e-8        # Adam's epsilon (PyTorch's default 1e-8)
    adam_beta2: float = 0.999     # Adam's second-moment decay (PyTorch's default 0.999)
    logvar_bias: float | None = None  # VAE: initial fc_logvar bias, the posterior's log-variance (None: init's)
    output_bias: str = "init"     # last layer's bias: the init's, or "mean": the first batch's mean colour
    grad_centralization: bool = False  # centre the weight gradients of units with inputs >= 0 before a step
    icnr: bool = False            # stride-2 transposed convs start as nearest-neighbour upsampling + 2x2 conv

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
# Chosen from the seed tables in docs/recipes.md (5,000 synthetic faces, 10 epochs, batch 128, seeds 0-4;
# bench/quality.py). Each VAE field fixes one failure measured there: the centred init the units dead at
# step 0, logvar_bias the 3-epoch stall at the mean face, output_bias and grad_centralization the
# enc_conv3 channels Adam killed in the first epochs. Once those units survive, a 3e-3 peak gains 0.4-0.5
# dB at every seed over 2e-3 (1e-3 lost 1 dB). 4e-3 gains another 0.1-0.3 dB but kills units as a run gets
# longer and noisier (the demo's batch 64: 13 % of enc_conv3 dead against 6 % at 3e-3), the failure real
# faces showed, so the peak stays at 3e-3; a 30-step warm-up still costs 0.05-0.1 dB. The AE has no
# posterior and loses few units: it trains further in the same steps at 6e-3 with a short warm-up
# (gradient centralization gave it nothing; 5e-3, 7e-3 or a 60-step warm-up no more), and with Adam's
# beta2 at 0.95 (+0.8-1.1 dB): at PyTorch's 0.999 the second moment averages ~1,000 steps, more than a
# 10-epoch run here has, so at the end it still holds the first steps' large gradients and the last
# steps were ~4x smaller than with 0.95 at the same lr (median |m|/sqrt(v) per weight 0.03 against 0.12),
# a decay nobody chose. The VAE gains 0.2 dB from 0.95 too, but like a 4e-3 peak it kills enc_conv3
# units in the demo's run (10 % dead against 6 %), so it keeps 0.999.
# ICNR (issue 20) starts both stride-2 upsampling layers free of the checkerboard their 3x3 kernels make:
# at seeds 0-4 it took the samples' near-Nyquist energy share from 3.9-14.5x the test images' to
# 1.5-2.3x, test PSNR +0.12 to +0.53 dB, no more dead units, and 2-epoch runs from 15.4-17.5 to 19.6-20.2 dB.
DEFAULT_VAE = Recipe("default", lr=3e-3, warmup_steps=100, decay="cosine", final_lr=0.05, kl_warmup_steps=200,
                     reduction="image", init="centred", logvar_bias=-6.0, output_bias="mean",
                     grad_centralization=True, icnr=True)
DEFAULT_AE = replace(DEFAULT_VAE, lr=6e-3, warmup_steps=30, logvar_bias=None, output_bias="init",
                     grad_centralization=False, adam_beta2=0.95, icnr=False)
RECIPES = {"default": {"ae": DEFAULT_AE, "vae": DEFAULT_VAE}, "notebook": {"ae": NOTEBOOK, "vae": NOTEBOOK}}


def initialize(model: nn.Module, init: str, logvar_bias: float | None = None, icnr: bool = False) -> nn.Module:
    """Re-initialize a freshly built model in place ("torch": leave PyTorch's defaults).

    "he": every layer followed by a ReLU gets N(0, 2 / fan_in) weights (He et al. 2015), every other layer
    N(0, 1 / fan_in), and all biases 0, so at step 0 each ReLU unit is positive on about half the inputs
    instead of on none for an unlucky negative bias. fan_in counts the inputs that reach one output: for a
    transposed convolution in_channels * k * k / stride^2.

    "centred": "he", then every output unit of a layer followed by a ReLU has its weights shifted to sum to
    zero. The inputs of these layers but the decoder's first are all >= 0 (pixels in [0, 1], or ReLU
    outputs; see rectified_input_layers), so with "he" a unit's
    pre-activation is about (sum of its weights) x (input level): a unit whose weights happen to sum
    negative is negative on every image and dead from step 0 (12-34 % of enc_conv1 at seeds 0-2). A
    zero-sum unit responds to contrast, not level, and is positive on part of the inputs.

    logvar_bias (VAE): fc_logvar's bias, the posterior's initial log-variance. At 0 (sigma 1) the noise of
    z = mu + sigma * eps drowns mu, whose spread over images is ~0.07 at step 0: the decoder sees noise and
    learns the mean face first (seed 1 of issue 9 sat near the mean image for 3 epochs). At -6 (sigma
    0.05) z carries the image from the first step and the KL term raises sigma as it pays.
    """
    if init != "torch":
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
    if icnr:
        relu_inputs = set(map(id, relu_layers(model).values()))
        for module in model.modules():
            if isinstance(module, nn.ConvTranspose2d) and module.stride == (2, 2):
                nearest_upsampling_init(module, centre=init == "centred" and id(module) in relu_inputs)
    if logvar_bias is not None and isinstance(model, VAE):
        with torch.no_grad():
            model.fc_logvar.bias.fill_(logvar_bias)
    return model


def nearest_upsampling_init(layer: nn.ConvTranspose2d, centre: bool = False) -> None:
    """Make a stride-2 transposed convolution start as nearest-neighbour upsampling followed by a
    random 2x2 convolution, so its first outputs carry no checkerboard (the "checkerboard artifact
    free" initialisation of Aitken et al. 2017, ICNR, here for a transposed convolution).

    The seed's 3x3, stride-2 layers give an even output pixel one tap per axis and an odd one two,
    so random weights make a period-2 pattern from any smooth input. A kernel that is a 2x2 kernel K
    convolved with a 2x2 box, [K0, K0 + K1, K1] per axis, gives every output pixel the same sum K0 + K1.
    K is drawn so the layer's output variance is what the layer's current init gives (its weights'
    std), zero-sum per output unit when ``centre`` (the "centred" init), and the bias is kept."""
    cin, cout, kh, kw = layer.weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"nearest_upsampling_init needs a 3x3 kernel, not {kh}x{kw}")
    with torch.no_grad():
        # per output pixel the old weights give (1 + 2 + 2 + 4) / 4 = 2.25 taps of variance s^2 on
        # average; the new ones 4 sums of K's entries: 4 v = 2.25 s^2
        std = 0.75 * float(layer.weight.std())
        k = torch.randn(cin, cout, 2, 2).to(layer.weight) * std
        if centre:
            n = cin * 4
            k.sub_(k.mean(dim=(0, 2, 3), keepdim=True)).mul_(math.sqrt(n / (n - 1)))
        box = torch.ones(1, 1, 2, 2).to(k)
        # full 2-D convolution of each (in, out) 2x2 kernel with the box: 3x3
        w = torch.nn.functional.conv2d(k.reshape(-1, 1, 2, 2), box, padding=1).reshape(cin, cout, 3, 3)
        layer.weight.copy_(w)


def set_output_bias(model: nn.Module, mean_rgb: torch.Tensor) -> None:
    """Set the bias of the layer before the final sigmoid so that, with the rest of the model at its
    initial weights, each output channel sits near the data's mean colour (data-dependent init, as in
    Salimans & Kingma 2016; "initialise the final bias to the target's mean"). Otherwise the first steps
    spend the largest and most uniform gradient of the run on moving every output from 0.5 to the mean
    face, and that push reaches the encoder through z and drives whole units of enc_conv3 below zero
    (seed 1 of issue 9: 19 % of enc_conv3 dead after 31 steps with a zero bias, 3 % with this)."""
    last = _unwrap(model)
    last = last.dec_conv3 if hasattr(last, "dec_conv3") else last.decoder[-2]
    with torch.no_grad():
        last.bias.copy_(torch.logit(mean_rgb.float().clamp(0.01, 0.99)).to(last.bias))


def rectified_input_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that feed a ReLU and take inputs >= 0 (pixels, or a ReLU's outputs): all of
    health.relu_layers but the decoder's first, whose input (the VAE's dec_fc(z), the AE's code) is signed."""
    return {n: m for n, m in relu_layers(model).items() if n not in ("dec_conv1", "decoder.0")}


def centralize_gradients(model: nn.Module) -> None:
    """Gradient centralization (Yong et al. 2020, ECCV) on every layer that feeds a ReLU and takes inputs
    >= 0 (rectified_input_layers): subtract from each output unit's weight gradient its mean over the
    unit's inputs, so a gradient step never moves the sum of a unit's weights (Adam's per-weight scaling
    moves it only a little: the centred init's zero stays near zero).

    Why here: these layers' inputs are all >= 0, so when a unit should be less active on average, every
    one of its weights gets a gradient of the same sign, and Adam, which moves each weight by ~lr whatever
    the gradient's size, moves all 1,568 of an enc_conv3 unit's weights down together: the unit's mean
    pre-activation falls by ~fan_in x lr per step and the whole channel dies (seed 1 of issue 9: 6 channels
    of enc_conv3 dead by step 124, their weight sums 0 -> -13..-25 while the biases moved by 0.01).
    Centred, the gradient keeps the part that tells a unit which inputs matter, and the bias alone moves
    the level. Call after backward (gradients all-reduced, possibly scaled) and before the step."""
    for layer in rectified_input_layers(model).values():
        grad = layer.weight.grad
        if grad is not None:
            dims = (0, 2, 3) if isinstance(layer, nn.ConvTranspose2d) else tuple(range(1, grad.dim()))
            grad.sub_(grad.mean(dim=dims, keepdim=True))


def resolve(name: str, model: str, **overrides) -> Recipe:
    """The named recipe for model "ae" or "vae" with the given fields replaced (None values are ignored)."""
    return replace(RECIPES[name][model], **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------- command line
def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe and one flag per field of it (each None unless given: the recipe's value stands)."""
    def both(field: str, fmt: str = "g") -> str:
        """The field's value in each recipe, e.g. "default: AE 0.006, VAE 0.003; notebook 0.001"."""
        ae, vae, nb = (format(getattr(r, field), fmt) for r in (DEFAULT_AE, DEFAULT_VAE, NOTEBOOK))
        return f"default: {ae if ae == vae else f'AE {ae}, VAE {vae}'}; notebook {nb}"

    g = parser.add_argument_group(
        "training recipe", "--recipe picks a whole schedule; each flag below replaces one field of it "
                           "(see fastceleba/recipe.py and docs/recipes.md's measurements)")
    g.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="'default': lr warm-up + cosine decay, KL annealing, per-image loss, zero-sum He init; "
                        "for the AE also Adam's beta2 0.95; "
                        "for the VAE also a small initial posterior variance, a mean-colour output bias, "
                        "gradient centralization and checkerboard-free upsampling layers (--icnr); "
                        "'notebook': the seed's exact schedule (Adam 1e-3 constant, beta 1, summed loss, "
                        "PyTorch's init)")
    g.add_argument("--lr", type=float, help=f"peak Adam learning rate ({both('lr')})")
    g.add_argument("--warmup-steps", type=int,
                   help=f"steps of linear learning-rate warm-up, at most 30%% of the run ({both('warmup_steps', 'd')})")
    g.add_argument("--decay", choices=DECAYS,
                   help=f"learning rate after the warm-up ({both('decay', 's')})")
    g.add_argument("--final-lr", type=float,
                   help=f"with cosine/linear decay: the last step's lr as a fraction of the peak ({both('final_lr')})")
    g.add_argument("--init", choices=INITS,
                   help="initial weights: PyTorch's defaults ('torch'), He-normal with zero biases ('he'), or "
                        f"He-normal with each ReLU unit's weights summing to 0 ('centred') ({both('init', 's')})")
    g.add_argument("--logvar-bias", type=float,
                   help="VAE: initial bias of fc_logvar, i.e. the posterior's starting log-variance; negative "
                        "lets the encoder's signal through the sampling noise from step 0 "
                        f"(default {DEFAULT_VAE.logvar_bias:g}; notebook PyTorch's init)")
    g.add_argument("--output-bias", choices=OUTPUT_BIASES,
                   help="the last layer's initial bias: the init's ('init'), or set from the first batch so the "
                        f"first reconstruction is the data's mean colour ('mean') ({both('output_bias', 's')})")
    g.add_argument("--grad-centralization", action=argparse.BooleanOptionalAction,
                   help="before every step, centre the weight gradient of each unit with inputs >= 0 (every "
                        "ReLU layer but the decoder's first) over those inputs (gradient centralization, Yong et "
                        "al. 2020), so Adam cannot push all of a unit's weights down together and kill it "
                        f"({both('grad_centralization', '')})")
    g.add_argument("--icnr", action=argparse.BooleanOptionalAction,
                   help="start each stride-2 transposed convolution as nearest-neighbour upsampling followed by a "
                        "random 2x2 convolution (Aitken et al. 2017), so the first samples carry no checkerboard "
                        f"({both('icnr', '')})")
    g.add_argument("--beta", type=float,
                   help="weight of the VAE's KL term once annealed (1: the ELBO; other values: beta-VAE) "
                        f"({both('beta')})")
    g.add_argument("--kl-warmup-steps", type=int,
                   help="steps over which the KL weight rises linearly from 0 to --beta, at most 60%% of the run "
                        f"({both('kl_warmup_steps', 'd')})")
    g.add_argument("--loss-reduction", choices=REDUCTIONS,
                   help="VAE loss backpropagated as the batch 'sum' or its mean per 'image' (same optimum, "
                        f"gradients fp16 can hold); the AE always uses the notebook's MSE ({both('reduction', 's')})")
    g.add_argument("--clip-grad-norm", type=float,
                   help=f"clip the global gradient norm to this before each step, 0: never ({both('clip_grad_norm')})")
    g.add_argument("--free-bits", type=float,
                   help="VAE: per-latent KL floor in nats, below which the KL term gives no gradient (free bits; "
                        f"0: none) ({both('free_bits')})")
    g.add_argument("--adam-eps", type=float, help=f"Adam's epsilon ({both('adam_eps')})")
    g.add_argument("--adam-beta2", type=float,
                   help="Adam's second-moment decay: lower forgets the first steps' large gradients sooner, so late "
                        "steps stay as large as the lr schedule says "
                        f"({both('adam_beta2')})")


def check_recipe_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error() (exit 2) for a recipe flag out of its range."""
    rules = {"lr": (lambda v: v > 0, "a positive number"), "adam_eps": (lambda v: v > 0, "a positive number"),
             "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
             "kl_warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
             "final_lr": (lambda v: 0 <= v <= 1, "between 0 and 1"),
             "beta": (lambda v: v >= 0, "a number >= 0"), "clip_grad_norm": (lambda v: v >= 0, "a number >= 0"),
             "free_bits": (lambda v: v >= 0, "a number >= 0"), "logvar_bias": (lambda v: True, "a number"),
             "adam_beta2": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")}
    for name, (ok, what) in rules.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            parser.error(f"--{name.replace('_', '-')} must be {what}")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The --recipe with the single-field flags applied."""
    return resolve(args.recipe, args.model, lr=args.lr, warmup_steps=args.warmup_steps, decay=args.decay,
                   final_lr=args.final_lr, init=args.init, logvar_bias=args.logvar_bias,
                   output_bias=args.output_bias, grad_centralization=args.grad_centralization, icnr=args.icnr,
                   beta=args.beta,
                   kl_warmup_steps=args.kl_warmup_steps, reduction=args.loss_reduction,
                   clip_grad_norm=args.clip_grad_norm, free_bits=args.free_bits, adam_eps=args.adam_eps,
                   adam_beta2=args.adam_beta2)
