"""The seed notebook's Autoencoder and VAE, their losses, and safetensors save/load.

Layers, names and shapes match the notebook exactly (64x64 RGB in [0, 1] -> 64x10x10 bottleneck ->
64x64 RGB through a sigmoid), so weights trained here load into the notebook's classes and back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fastceleba.errors import DataError
from fastceleba.files import atomic_path, atomic_write

MODELS = ("ae", "vae")
FEATURES = 64 * 10 * 10  # channels x height x width after the third encoder conv on a 64x64 input
# Range of the VAE's log-variance: exp(20) fits float32, so the KL term stays finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Bound of a sampled z. Under fp16 autocast dec_fc takes z in float16 (max 65504): at logvar 20 the
# std is 22026, so z overflowed for |eps| > 2.97. 1,000 prior standard deviations is never reached
# by a working model, and keeps dec_fc's fp16 input (and, at the initial weight scale, its output)
# finite.
Z_MAX = 1000.0
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class Autoencoder(nn.Module):
    """The notebook's convolutional autoencoder, layer for layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),  # [batch, 16, 32, 32]
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),  # [batch, 32, 16, 16]
            nn.ReLU(),
            nn.Conv2d(32, 64, 7),  # [batch, 64, 10, 10]
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 7),  # [batch, 32, 16, 16]
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),  # [batch, 16, 32, 32]
            nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 3, stride=2, padding=1, output_padding=1),  # [batch, 3, 64, 64]
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VAE(nn.Module):
    """The notebook's VAE; latent_dim is an argument instead of a global.

    Only differences, both no-ops for a working model: encode() clamps logvar to [LOGVAR_MIN,
    LOGVAR_MAX] and reparameterize() samples in float32 and clamps z to [-Z_MAX, Z_MAX], so a
    diverging encoder cannot overflow fp16 where z enters the decoder.
    """

    def __init__(self, latent_dim: int = 80) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim
        self.enc_conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.enc_conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.enc_conv3 = nn.Conv2d(32, 64, 7)
        self.fc_mu = nn.Linear(in_features=FEATURES, out_features=latent_dim)
        self.fc_logvar = nn.Linear(in_features=FEATURES, out_features=latent_dim)
        self.dec_fc = nn.Linear(in_features=latent_dim, out_features=FEATURES)
        self.dec_conv1 = nn.ConvTranspose2d(64, 32, 7)
        self.dec_conv2 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
        self.dec_conv3 = nn.ConvTranspose2d(16, 3, 3, stride=2, padding=1, output_padding=1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + eps * std, eps ~ N(0, I) (from ``generator`` when given, e.g. evaluation's own)."""
        std = torch.exp(0.5 * logvar.float())  # float32 whatever autocast's policy for exp
        eps = torch.randn_like(std) if generator is None else torch.randn(
            std.shape, generator=generator, device=std.device, dtype=std.dtype)
        return (mu.float() + eps * std).clamp(-Z_MAX, Z_MAX)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.enc_conv1(x))
        x = F.relu(self.enc_conv2(x))
        x = F.relu(self.enc_conv3(x))
        x = x.reshape(x.size(0), -1)
        mu = self.fc_mu(x)
        # The clamp (not in the notebook): a diverging encoder could otherwise emit a logvar whose
        # exp() is inf, turning the loss into inf/NaN. Inside the range it is a no-op.
        logvar = self.fc_logvar(x).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.dec_fc(z)
        z = z.view(z.size(0), 64, 10, 10)
        z = F.relu(self.dec_conv1(z))
        z = F.relu(self.dec_conv2(z))
        return torch.sigmoid(self.dec_conv3(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Decode n draws z ~ N(0, T² I) from the prior at temperature T (no grad; T = 1 is the prior itself,
        a lower T keeps z where the posteriors put most of their mass); the generator must live on the
        model's device."""
        weight = self.dec_fc.weight
        z = torch.randn(n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z * temperature if temperature != 1.0 else z)


def build_model(name: str, latent_dim: int = 80) -> nn.Module:
    """A fresh "ae" or "vae"; the AE has no latent size (its bottleneck is 64x10x10) and ignores latent_dim."""
    if name == "ae":
        return Autoencoder()
    if name == "vae":
        return VAE(latent_dim)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ae_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The notebook's nn.MSELoss() (mean), computed in float32 even when autocast produced fp16/bf16 outputs."""
    return F.mse_loss(recon.float(), x.float())


def vae_loss(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The notebook's ELBO summed over the batch, in float32: (mse_sum + beta * kld_sum, mse_sum, kld_sum).

    beta=1 is the notebook's loss; other values weight only the KL term (beta-VAE).
    """
    x = x.float()
    recon = recon.float().reshape_as(x)
    mu, logvar = mu.float(), logvar.float()
    mse = F.mse_loss(recon, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return mse + beta * kld, mse, kld


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def save_pretrained(model: nn.Module, directory: str | os.PathLike, config: dict[str, Any] | None = None) -> Path:
    """Write directory/model.safetensors and directory/config.json ({"model", "latent_dim" (VAE only), **config}).

    Returns the directory. Wrapped models (torch.compile, DDP) are saved under their plain layer names.
    """
    model = _unwrap(model)
    if isinstance(model, VAE):
        meta: dict[str, Any] = {"model": "vae", "latent_dim": model.latent_dim}
    elif isinstance(model, Autoencoder):
        meta = {"model": "ae"}
    else:
        raise TypeError(f"save_pretrained takes an Autoencoder or VAE, got {type(model).__name__}")
    extra = dict(config or {})
    for key, value in meta.items():
        if key in extra and extra[key] != value:
            raise ValueError(f"config[{key!r}]={extra[key]!r} contradicts the model ({value!r})")
    full = {**meta, **{k: v for k, v in extra.items() if k not in meta}}
    text = json.dumps(full, indent=2, sort_keys=False) + "\n"  # fails here, before any file is touched

    # A compiled submodule would still carry "_orig_mod." inside its keys; drop it too.
    tensors = {
        k.replace("_orig_mod.", ""): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write(out / CONFIG_NAME, text)
    return out


def _weights_describe(tensors: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """(model, latent_dim) that a state dict was saved from, as far as its keys tell."""
    if "fc_mu.weight" in tensors and tensors["fc_mu.weight"].dim() == 2:
        return "vae", int(tensors["fc_mu.weight"].shape[0])
    if "encoder.0.weight" in tensors:
        return "ae", None
    return None, None


def load_pretrained(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by save_pretrained; returns (model in eval mode on map_location, config)."""
    root = Path(directory)
    cfg_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    fix = "point to a directory written by save_pretrained (it holds config.json and model.safetensors)"
    if not cfg_path.is_file():
        raise DataError(f"{cfg_path}: missing; {fix}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{cfg_path}: unreadable JSON ({e}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise DataError(f"{cfg_path}: expected a JSON object; re-save the model with save_pretrained")
    name = config.get("model")
    if name not in MODELS:
        raise DataError(f"{cfg_path}: 'model' is {name!r}, expected one of {', '.join(MODELS)}; fix config.json")
    latent_dim = config.get("latent_dim", 80)
    if name == "vae" and (not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1):
        raise DataError(f"{cfg_path}: 'latent_dim' is {latent_dim!r}, expected a positive integer; fix config.json")
    if not weights_path.is_file():
        raise DataError(f"{weights_path}: missing; {fix}")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (OSError, safetensors.SafetensorError) as e:
        raise DataError(f"{weights_path}: not a readable safetensors file ({e}); re-save the model") from None

    model = build_model(name, latent_dim)
    expected = model.state_dict()
    found_name, found_dim = _weights_describe(tensors)
    if found_name is not None and found_name != name:
        raise DataError(f"{weights_path}: weights are for model '{found_name}' but config.json says '{name}'; "
                        "fix config.json or re-save with save_pretrained")
    if name == "vae" and found_dim is not None and found_dim != latent_dim:
        raise DataError(f"{weights_path}: weights are for latent_dim={found_dim} but config.json says {latent_dim}; "
                        "fix config.json or re-save with save_pretrained")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DataError(f"{weights_path}: tensors do not fit a '{name}' model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); re-save with save_pretrained")
    for key, ref in expected.items():
        if tensors[key].shape != ref.shape:
            raise DataError(f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected "
                            f"{tuple(ref.shape)} for config.json; re-save with save_pretrained")
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval(), config
