"""Sample quality: FID and KID of the VAE's prior samples (T = 1) and of its reconstructions, against test images.

Both numbers come from torchmetrics (``FrechetInceptionDistance``, ``KernelInceptionDistance``): the
statistics, the formulas and the reduction over ranks are its. This module feeds them features computed
once per image, so the test images' Inception features serve both comparisons:

- ``fid``: Fréchet distance between Gaussians fitted to the features of the test images and of as many
  prior samples (z ~ N(0, I), T = 1): d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- ``fid_recon``: the same against the VAE's reconstructions decode(mu) of those test images (the AE's
  outputs for the AE). ``prior_hole`` = fid - fid_recon: how much worse the decoder does from the prior
  than from the posterior (latents the prior gives but no training face used).
- ``kid`` / ``kid_recon``: kernel inception distance, the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (x·y / d + 1)³, mean (and ``*_std``) over ``KID_SUBSETS`` random subsets of
  min(``KID_SUBSET_SIZE``, n) images, drawn from a fixed seed.

The features are the standard ones only: Inception-v3's 2048 pool features with the 2015-12-05 TensorFlow
weights as torch-fidelity converts them (``STANDARD_FILE``, sha256 starting ``STANDARD_SHA256_PREFIX``),
images resized to 299 with TensorFlow 1's bilinear resize (torchmetrics' ``antialias=False``, as
torch-fidelity does), so the numbers compare with published CelebA 64x64 FIDs computed the same way
(at the same number of images: FID is biased upwards at small n). Where those weights are neither given
(``--inception-weights PATH`` or ``FASTCELEBA_INCEPTION_WEIGHTS``), nor in torch's hub cache, nor
downloadable (``FASTCELEBA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbid the download), the run prints one
``note:`` line and records ``"fid": null`` etc. with the reason: never a number from other weights.
Weights load with ``torch.load(weights_only=True)`` or safetensors; a ``.pth`` must have the standard hash.

Beside the distances, ``hf_share`` / ``hf_ratio`` (``high_frequency_energy``): the share of spectral energy near
Nyquist in samples and reconstructions against the test images', a feature-free check for the checkerboard
a stride-2 upsampling layer prints.

``RandomConvFeatures`` is a stand-in that is *not* Inception: a fixed random conv net whose distances are
named ``rfd`` and ``rkid`` (random-feature Fréchet/kernel distance). They compare runs of this toolkit
with one another without any download, and exercise every step but the weights; they are not FIDs.
"""

from __future__ import annotations

import os
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator
from unittest import mock

import torch
from torch import nn

from fastceleba.files import atomic_path
from fastceleba.models import VAE
from fastceleba.pictures import reconstruct
from fastceleba.shards import file_sha256 as sha256

STANDARD_FILE = "weights-inception-2015-12-05-6726825d.pth"
STANDARD_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + STANDARD_FILE
STANDARD_SHA256_PREFIX = "6726825d"
ENV_WEIGHTS = "FASTCELEBA_INCEPTION_WEIGHTS"
OFFLINE_ENVS = ("FASTCELEBA_OFFLINE", "HF_HUB_OFFLINE")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
DOWNLOAD_TIMEOUT_S = 30
FEATURES = ("inception", "random-conv", "none")


class Features(nn.Module):
    """Images (N x 3 x H x W, float in [0, 1]) -> features (N x dim); the names its two distances go by."""
    dim: int
    fd_name: str
    kd_name: str
    description: str


class InceptionFeatures(Features):
    """The standard FID features: torchmetrics' Inception-v3 (torch-fidelity's port), pool3, 2048-d."""
    fd_name, kd_name, dim = "fid", "kid", 2048
    description = "Inception-v3 pool3 (2048), TF 2015-12-05 weights, TF1 bilinear resize to 299"

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as fidelity
        from torchmetrics.image.fid import NoTrainInceptionV3
        # torch-fidelity reads the file itself with weights_only=False (or downloads it): hand it the
        # state dict we loaded safely instead. load_state_dict is strict: other layers fail here.
        with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: state_dict):
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 as an image file would hold it (round, not truncate), which is what the net expects
        return self.net((x.float().clamp(0, 1) * 255).round().to(torch.uint8))


class RandomConvFeatures(Features):
    """NOT Inception: a fixed random conv net (weights from ``seed``), its ReLU maps average-pooled at three
    scales (32 + 64 + 128 = 224 features). Its distances are "rfd" and "rkid", never "fid"/"kid"."""
    fd_name, kd_name, dim = "rfd", "rkid", 224
    description = "random conv net (NOT Inception): 3 random 4x4 stride-2 convs + ReLU, pooled, 224 features"

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        for cin, cout in ((3, 32), (32, 64), (64, 128)):
            conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
            with torch.no_grad():  # He-normal from our generator: the same net on every machine
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (cin * 16)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, pooled = (x.float() - 0.5) / 0.5, []
        for conv in self.convs:
            h = torch.relu(conv(h))
            pooled.append(h.mean(dim=(2, 3)))
        return torch.cat(pooled, 1)


class _Given(nn.Module):
    """Hands torchmetrics features computed already (``num_features`` spares its trial run of the net)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def cached_weights() -> Path:
    """Where torch-fidelity and torchmetrics keep the downloaded weights (torch's hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / STANDARD_FILE


def offline() -> str | None:
    """The environment variable that forbids downloads, if one is set."""
    return next((name for name in OFFLINE_ENVS if os.environ.get(name, "") not in ("", "0")), None)


def download(dst: Path) -> str | None:
    """Fetch the standard weights to dst (atomically, hash checked); None when done, else why not."""
    if (why := offline()) is not None:
        return f"downloads are off ({why} is set)"
    try:
        with atomic_path(dst) as tmp:
            with urllib.request.urlopen(STANDARD_URL, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
            if not sha256(tmp).startswith(STANDARD_SHA256_PREFIX):
                raise OSError("the downloaded file has the wrong sha256")
    except OSError as e:  # URLError, timeouts, a full disk
        return f"the download from {STANDARD_URL} failed ({getattr(e, 'reason', e)})"
    return None


def find_weights(path: str | None, may_download: bool = True) -> tuple[Path | None, str]:
    """(the weights file, "") or (None, why there is none): --inception-weights / $FASTCELEBA_INCEPTION_WEIGHTS,
    else torch's hub cache, else a download into it (when may_download and downloads are allowed)."""
    given = path or os.environ.get(ENV_WEIGHTS)
    if given:
        p = Path(given).expanduser()
        return (p, "") if p.is_file() else (None, f"{given}: no such file")
    cached = cached_weights()
    if cached.is_file():
        return cached, ""
    why = download(cached) if may_download else "not downloaded"
    if why is None and cached.is_file():
        return cached, ""
    return None, f"no Inception weights on disk ({cached}) and {why}"


def load_inception(path: Path) -> InceptionFeatures:
    """The standard Inception from a file, loaded without unpickling code; ValueError if it is not it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        digest = sha256(path)
        if not digest.startswith(STANDARD_SHA256_PREFIX):
            raise ValueError(f"{path}: sha256 {digest[:8]}... is not the standard weights' "
                             f"({STANDARD_SHA256_PREFIX}..., {STANDARD_FILE})")
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return InceptionFeatures(state)
    except (RuntimeError, KeyError, TypeError) as e:  # missing/unexpected keys or other shapes
        raise ValueError(f"{path}: not torch-fidelity's Inception-v3 weights ({str(e).splitlines()[0]})") from None


def make_features(kind: str, weights: str | None, accelerator: Any) -> tuple[Features | None, str]:
    """The feature net a run's sample quality uses, or (None, why not); every rank must call it (the ranks
    agree, so either all compute or none). Downloads, where allowed, happen on one process per node."""
    if kind == "none":
        return None, "--sample-features none"
    if kind == "random-conv":
        return RandomConvFeatures(), ""
    # one process per node fetches into the hub cache if it may; the others wait for it
    first = find_weights(weights) if accelerator.is_local_main_process else None
    accelerator.wait_for_everyone()
    path, why = find_weights(weights, may_download=False)
    why = first[1] if path is None and first is not None else why
    net = None
    if path is not None:
        try:
            net = load_inception(path)
        except ValueError as e:
            why = str(e)
    ok = torch.tensor(int(net is not None), device=accelerator.device)
    if accelerator.num_processes > 1 and int(accelerator.reduce(ok, reduction="min")) == 0 and net is not None:
        net, why = None, "another process found no usable Inception weights"
    return net, why


@contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 inside (train.py turns it on for CUDA): the features as the reference computes them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def not_computed(features: str, why: str) -> dict:
    """summary.json's record when there are no features: the standard names, null, and the reason."""
    return {"features": features, "computed": False, "reason": why,
            **{k: None for k in ("fid", "fid_recon", "prior_hole", "kid", "kid_recon")}}


@torch.no_grad()
def sample_quality(model: nn.Module, loader: Iterable[dict], accelerator: Any, features: Features, seed: int = 0,
                   temperature: float = 1.0, kid_subsets: int = KID_SUBSETS,
                   kid_subset_size: int = KID_SUBSET_SIZE) -> dict:
    """Fréchet and kernel distances of prior samples (VAE) and reconstructions against ``loader``'s images,
    over all ranks (every rank must call it; each valid image counts once, and each rank draws one prior
    sample per valid image from a generator seeded with seed + rank). Names from ``features``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    device = accelerator.device
    was_training = model.training
    model.eval()
    features = features.to(device).eval()
    given = _Given(features.dim)
    with warnings.catch_warnings():  # KID's note that it keeps every feature in memory
        warnings.simplefilter("ignore", UserWarning)
        fd = {k: FrechetInceptionDistance(feature=given, reset_real_features=False).to(device)
              for k in ("samples", "recon")}
        kd = KernelInceptionDistance(feature=given, reset_real_features=False, subsets=kid_subsets,
                                     subset_size=kid_subset_size).to(device)
    is_vae = isinstance(model, VAE)
    gen = torch.Generator(device=device).manual_seed(seed + accelerator.process_index)
    fakes: dict[str, list[torch.Tensor]] = {"samples": [], "recon": []} if is_vae else {"recon": []}
    n = torch.zeros((), dtype=torch.int64, device=device)
    spectra = torch.zeros(len(fakes) + 1, 2, dtype=torch.float64, device=device)  # (high band, all) energy
    for batch in loader:
        x = batch["image"][batch["valid"]]
        if x.shape[0] == 0:
            continue
        with accelerator.autocast():
            images = {"recon": reconstruct(model, x)}
            if is_vae:
                images["samples"] = model.sample(x.shape[0], generator=gen, temperature=temperature)
        with torch.autocast(device.type, enabled=False), full_float32():  # the feature net in true float32
            real = features(x.float()).double()
            for key, value in images.items():
                f = features(value.float()).double()
                fd[key].update(f, real=False)
                fakes[key].append(f)
            for key in fakes:
                fd[key].update(real, real=True)
            kd.update(real, real=True)
            for row, value in enumerate([x] + [images[key] for key in fakes]):
                spectra[row] += high_frequency_energy(value.float())
        n += x.shape[0]
    model.train(was_training)
    total = int(accelerator.reduce(n.clone(), reduction="sum")) if accelerator.num_processes > 1 else int(n)
    out: dict[str, Any] = {"features": features.description, "computed": True, "num_images": total,
                           "temperature": temperature if is_vae else None}
    if total < 2:
        return {**out, "computed": False, "reason": f"{total} test images; the distances need at least 2"}
    kd.subset_size = min(kid_subset_size, total)
    names = {"samples": "", "recon": "_recon"}
    for key in fakes:
        out[features.fd_name + names[key]] = float(fd[key].compute())
        kd.reset()  # keeps the real features
        for f in fakes[key]:
            kd.update(f, real=False)
        with torch.random.fork_rng(devices=[]):  # KID's subsets: from a fixed seed, the run's RNG untouched
            torch.manual_seed(seed)
            mean, std = kd.compute()
        out[features.kd_name + names[key]], out[features.kd_name + names[key] + "_std"] = float(mean), float(std)
    if is_vae:
        out["prior_hole"] = out[features.fd_name] - out[features.fd_name + "_recon"]
    if accelerator.num_processes > 1:
        spectra = accelerator.reduce(spectra, reduction="sum")
    share = (spectra[:, 0] / spectra[:, 1]).tolist()
    out["hf_share_test"] = share[0]
    for key, value in zip(fakes, share[1:]):
        out["hf_share" + names[key]] = value
        out["hf_ratio" + names[key]] = value / share[0]
    out[features.kd_name + "_subsets"], out[features.kd_name + "_subset_size"] = kid_subsets, kd.subset_size
    return out


HF_BAND = 3 / 8  # cycles per pixel; the checkerboard of a stride-2 layer sits at 1/2 (Nyquist)


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """(energy at >= HF_BAND cycles/pixel on either axis, all energy) of the images' luminance with each
    image's mean removed, summed over the batch: the spectral share near Nyquist. Feature-free and
    cheap, so it runs beside every FID pass; a stride-2 upsampling checkerboard and per-pixel noise
    raise it, blur lowers it (summary.json: hf_share for samples, reconstructions and test images, and
    hf_ratio = samples' share / the test images')."""
    gray = images.mean(dim=1).double()
    gray = gray - gray.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.rfft2(gray).abs().square()
    fy = torch.fft.fftfreq(gray.shape[1], device=gray.device).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(gray.shape[2], device=gray.device).view(1, -1)
    # rfft2 keeps half the x axis: every column but x = 0 and Nyquist stands for two conjugate ones
    weight = torch.full_like(fx, 2.0)
    weight[:, 0] = 1.0
    if gray.shape[2] % 2 == 0:
        weight[:, -1] = 1.0
    power = power * weight
    high = (fy >= HF_BAND) | (fx >= HF_BAND)
    return torch.stack([power[:, high].sum(), power.sum()])


def format_quality(q: dict) -> str:
    """A short text of sample_quality()'s numbers (or why there are none), for log lines."""
    if not q.get("computed"):
        return "FID not computed (see the note: line; summary.json says why)"
    fd, kd = ("FID", "KID") if "fid_recon" in q else ("random-feature FD (not FID)", "KD")
    f, k = ("fid", "kid") if fd == "FID" else ("rfd", "rkid")
    if f in q:
        return (f"{fd} {q[f]:.2f} prior samples (T = {q['temperature']:g}) / {q[f + '_recon']:.2f} reconstructions"
                f" (prior hole {q['prior_hole']:.2f}), {kd} x1000 {1000 * q[k]:.2f} / {1000 * q[k + '_recon']:.2f}")
    return f"{fd} {q[f + '_recon']:.2f} reconstructions, {kd} x1000 {1000 * q[k + '_recon']:.2f}"
