"""Model health: dead ReLU units, the VAE's active latent units, and the verdict "this run collapsed".

A *unit* is one output element (channel x position) of a layer followed by a ReLU; it is *dead* on a
split when its pre-activation is never positive on any image of the split, so it passes no signal and
gets no gradient (a dead unit never comes back). The layers: the VAE's enc_conv1-3 and dec_conv1-2, the
AE's encoder.0, encoder.2, decoder.0 and decoder.2 (the AE's third encoder conv has no ReLU).

The VAE's decoder units are judged on what the decoder trains on, z = mu + sigma * eps drawn from q(z|x)
(one draw per image, evaluation's own generator), not on the mean decode z = mu alone: a unit that fires
only with the posterior's spread still gets gradient. The difference is real: in docs/recipes.md's seed-3 run,
17 % of dec_conv1's units are never positive on mean decodes but 1.4 % on the draws (0 % on prior samples).

A VAE latent dimension d is *active* when Var_x(E[z_d | x]) = Var_x(mu_d(x)) > 0.01 over the split
(Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders", section 5.2): an inactive
dimension encodes nothing about the image and the decoder ignores it.

fastceleba.metrics.evaluate collects both over all ranks (the alive maps are OR-ed, the mean sums
added); this module holds the hooks and the rules, and never reads data itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fastceleba.models import VAE, _unwrap

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016
# A run "collapsed" when one of these holds (see problems()).
MIN_ACTIVE_FRACTION = 0.10
MIN_PSNR_GAIN_DB = 1.0
MAX_DEAD_FRACTION = 0.50


def relu_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module whose output goes into a ReLU}, named as in the model's state dict."""
    model = _unwrap(model)
    if isinstance(model, VAE):
        names = ("enc_conv1", "enc_conv2", "enc_conv3", "dec_conv1", "dec_conv2")
        return {n: getattr(model, n) for n in names}
    out = {}
    for prefix in ("encoder", "decoder"):
        seq = getattr(model, prefix)
        for i in range(len(seq) - 1):
            if isinstance(seq[i + 1], nn.ReLU):
                out[f"{prefix}.{i}"] = seq[i]
    return out


class DeadUnitProbe:
    """Forward hooks that record which units of every ReLU layer were ever positive on valid samples.

        with DeadUnitProbe(model) as probe:
            for batch in loader:
                probe.valid = batch["valid"]
                model(batch["image"])
        alive = probe.alive_counts()   # {layer: int tensor C x H x W}: 1 where the unit was ever positive

    Sum alive_counts() over ranks and test > 0: a unit alive on any rank is alive.
    """

    def __init__(self, model: nn.Module, image_size: int = 64):
        self.layers = relu_layers(model)
        self.valid: torch.Tensor | None = None
        self._hooks: list[Any] = []
        param = next(_unwrap(model).parameters())
        shapes: dict[str, torch.Size] = {}
        grab = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape[1:]))
                for n, m in self.layers.items()]
        try:
            with torch.no_grad():
                _unwrap(model)(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        finally:
            for h in grab:
                h.remove()
        self.alive = {n: torch.zeros(s, dtype=torch.bool, device=param.device) for n, s in shapes.items()}

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.valid is not None:
                output = output[self.valid.to(output.device, torch.bool)]
            if output.shape[0]:
                self.alive[name] |= (output > 0).any(0)
        return record

    def __enter__(self) -> "DeadUnitProbe":
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def alive_counts(self) -> dict[str, torch.Tensor]:
        return {n: a.to(torch.int32) for n, a in self.alive.items()}


def dead_fractions(alive_counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """{layer: fraction of units never positive}, from alive counts summed over ranks."""
    return {n: float((c == 0).sum()) / c.numel() for n, c in alive_counts.items()}


def dead_channel_fractions(alive_counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """{layer: fraction of channels whose every unit is dead}: such a channel's weights get no gradient at
    all, so it never comes back (a dead unit of a live channel can, as its shared weights still learn)."""
    return {n: float((c.flatten(1).sum(1) == 0).sum()) / c.shape[0] for n, c in alive_counts.items()}


def active_units(sum_mu: torch.Tensor, sum_mu2: torch.Tensor, n: float,
                 threshold: float = ACTIVE_THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of active latents, per-dimension variance) from sums of mu and mu^2 over n images."""
    mean = sum_mu.double() / n
    var = (sum_mu2.double() / n - mean.pow(2)).clamp_min(0)
    return int((var > threshold).sum()), var


def problems(metrics: dict) -> list[str]:
    """What is wrong with a model, judged from evaluate()'s numbers on one split; [] when healthy."""
    found = []
    if not metrics.get("num_samples"):
        return found
    if "active_units" in metrics:
        frac = metrics["active_units"] / metrics["latent_dim"]
        if frac < MIN_ACTIVE_FRACTION:
            found.append(f"only {metrics['active_units']}/{metrics['latent_dim']} latents active "
                         f"(Var[mu] > {ACTIVE_THRESHOLD})")
    gain = metrics.get("psnr_gain")
    if gain is not None and gain < MIN_PSNR_GAIN_DB:
        found.append(f"PSNR {metrics['psnr']:.2f} dB is within {MIN_PSNR_GAIN_DB:g} dB of the mean image's "
                     f"{metrics['baseline_psnr']:.2f} dB")
    for layer, frac in metrics.get("dead_fraction", {}).items():
        if frac > MAX_DEAD_FRACTION:
            found.append(f"{frac:.0%} of {layer}'s units are dead")
    return found


def warning_line(found: list[str], split: str, recipe: str) -> str:
    """The one line a collapsed run prints: what happened and what to try."""
    fix = ("train with the default recipe (drop --recipe notebook)" if recipe == "notebook" else
           "lengthen --warmup-steps / --kl-warmup-steps, add --free-bits or --clip-grad-norm, or try "
           "another --seed (a lower --lr made it worse in docs/recipes.md's measurements)")
    return f"warning: the model collapsed on the {split} split: {'; '.join(found)}. Try: {fix}."
