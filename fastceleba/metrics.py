"""Reconstruction metrics for the AE and VAE, summed over batches and ranks so each image counts once.

Every number is computed over all pixels of all evaluated images (pixel values in [0, 1]):

- ``mse``: mean squared error per pixel value, SS_res / (n * P), P = 3 * 64 * 64.
- ``psnr``: 10 * log10(1 / mse), from the mean MSE of the split (data range 1), not a mean of per-image PSNRs.
- ``r2``: 1 - SS_res / SS_tot, with SS_tot = sum over images i and pixel values j of (x_ij - xbar_j)^2, where
  xbar_j is pixel j averaged over the evaluated split (scikit-learn's ``r2_score(X, Xhat,
  multioutput="variance_weighted")`` on images flattened to rows). Predicting that split's own mean image
  scores exactly 0; a perfect reconstruction scores 1.
- ``baseline_*``: the same three numbers for the trivial model that outputs the mean *training* image for
  every input, so a reader can see what the model's numbers are worth.
- VAE only: ``kld`` = KL(q(z|x) || N(0, I)) per image, and ``neg_elbo`` = sum of squared errors of a
  reconstruction decoded from one sample z ~ q(z|x), plus kld, per image: the notebook's training loss
  (beta = 1), a one-sample estimate of -ELBO. ``mse``/``psnr``/``r2`` use the deterministic reconstruction
  decode(mu), the same one the pictures show.
- ``psnr_gain``: psnr - baseline_psnr, dB the model is worth over the mean image.
- Health (see fastceleba.health): ``dead_fraction`` {ReLU layer: fraction of units never positive on
  the split; the VAE's decoder layers on the z ~ q(z|x) draw, their training input},
  ``dead_channel_fraction`` {layer: fraction of channels all of whose units are dead}; VAE only:
  ``active_units`` of ``latent_dim`` (Var over the split of mu above 0.01).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from fastceleba.errors import DataError
from fastceleba.health import DeadUnitProbe, active_units, dead_channel_fractions, dead_fractions
from fastceleba.models import VAE


def _reduce(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op on one process)."""
    return accelerator.reduce(tensor.clone(), reduction="sum") if accelerator.num_processes > 1 else tensor


@torch.no_grad()
def mean_image(loader: Iterable[dict], accelerator: Any, split_name: str = "train") -> torch.Tensor:
    """The mean image (3 x H x W, float32 on the accelerator's device) of a split, in one pass over ``loader``.

    The loader must not augment (no flip) and should use drop_last=False so every image counts once.
    """
    total: torch.Tensor | None = None
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        x, valid = batch["image"], batch["valid"]
        part = (x.double() * valid.view(-1, 1, 1, 1)).sum(0)
        total = part if total is None else total + part
        count += valid.sum()
    if total is None:
        raise DataError(f"the {split_name} split has no images; re-shard with a non-empty {split_name} split")
    total, count = _reduce(accelerator, total), _reduce(accelerator, count)
    return (total / count).float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict], accelerator: Any, baseline: torch.Tensor,
             seed: int = 0) -> dict[str, float]:
    """Metrics of an unwrapped AE or VAE on one split (see the module docstring); every rank must call it.

    ``baseline`` is the mean training image (from mean_image). The VAE's z ~ q(z|x) draws come from a
    generator seeded with seed + rank, so the numbers do not depend on (or disturb) the training RNG.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    is_vae = isinstance(model, VAE)
    gen = torch.Generator(device=device).manual_seed(seed + accelerator.process_index)
    # n, SS_res, SS_res of the baseline, sum of x^2, SS_res of the sampled decode, KLD
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    sum_x: torch.Tensor | None = None
    mu_sums = torch.zeros(2, model.latent_dim if is_vae else 0, dtype=torch.float64, device=device)
    probe = DeadUnitProbe(model)
    for batch in loader:
        x, w = batch["image"], batch["valid"].double()
        probe.valid = batch["valid"]
        with accelerator.autocast():
            if is_vae:
                with probe:
                    mu, logvar = model.encode(x)
                recon = model.decode(mu)
                mu, logvar = mu.float(), logvar.float()
                with probe:  # the decoder's units on what it trains on: z drawn from q(z|x), not its mean alone
                    sampled = model.decode(model.reparameterize(mu, logvar, generator=gen))
            else:
                with probe:
                    recon = model(x)
        x64 = x.double()
        per_image = [
            w,
            (recon.float() - x).pow(2).flatten(1).sum(1).double() * w,
            (x - baseline).pow(2).flatten(1).sum(1).double() * w,
            x64.pow(2).flatten(1).sum(1) * w,
        ]
        if is_vae:
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
            per_image += [(sampled.float() - x).pow(2).flatten(1).sum(1).double() * w, kld.double() * w]
            mu64 = mu.double() * w.view(-1, 1)
            mu_sums += torch.stack([mu64.sum(0), (mu64 * mu.double()).sum(0)])
        sums[: len(per_image)] += torch.stack([t.sum() for t in per_image])
        part = (x64 * w.view(-1, 1, 1, 1)).sum(0)
        sum_x = part if sum_x is None else sum_x + part
    model.train(was_training)
    if sum_x is None:  # an empty split: no batches on any rank
        return {"num_samples": 0}
    sums, sum_x = _reduce(accelerator, sums), _reduce(accelerator, sum_x)
    out = summarize(sums, sum_x, is_vae)
    alive = {name: _reduce(accelerator, a) for name, a in probe.alive_counts().items()}
    out["dead_fraction"] = dead_fractions(alive)
    out["dead_channel_fraction"] = dead_channel_fractions(alive)
    if is_vae:
        mu_sums = _reduce(accelerator, mu_sums)
        out["active_units"] = active_units(mu_sums[0], mu_sums[1], out["num_samples"])[0]
        out["latent_dim"] = model.latent_dim
    return out


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def summarize(sums: torch.Tensor, sum_x: torch.Tensor, is_vae: bool) -> dict[str, float]:
    """Turn the reduced sums of evaluate() into the reported numbers."""
    n, ss_res, ss_base, sum_sq, ss_sampled, kld = (float(v) for v in sums.tolist())
    values = n * sum_x.numel()  # pixel values evaluated
    ss_tot = sum_sq - float((sum_x.pow(2) / n).sum())
    out: dict[str, float] = {"num_samples": int(n)}
    for prefix, ss in (("", ss_res), ("baseline_", ss_base)):
        mse = ss / values
        out[f"{prefix}mse"] = mse
        out[f"{prefix}psnr"] = _psnr(mse)
        out[f"{prefix}r2"] = 1.0 - ss / ss_tot if ss_tot > 0 else float("nan")
    out["psnr_gain"] = out["psnr"] - out["baseline_psnr"]
    if is_vae:
        out["kld"] = kld / n
        out["neg_elbo"] = (ss_sampled + kld) / n
    return out


def format_metrics(m: dict) -> str:
    """One log line of evaluate()'s metrics, beside the mean-image baseline."""
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
