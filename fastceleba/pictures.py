"""PNG pictures of a trained AE/VAE: reconstructions, prior samples, interpolations, attribute edits.

Plain torchvision grids (no matplotlib); rows can carry a text label drawn with Pillow's default font.
Every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from fastceleba.files import atomic_path
from fastceleba.models import VAE

PAD = 2


def save_rows(rows: Sequence[torch.Tensor], path: str | os.PathLike, labels: Sequence[str] | None = None) -> Path:
    """Save equally long rows of images (each N x 3 x H x W in [0, 1]) as one PNG grid, labels on the left."""
    from torchvision.utils import make_grid  # here, not at the top: torchvision adds ~1 s to train.py's start-up

    ncol = rows[0].shape[0]
    grid = make_grid(torch.cat([r.detach().float().cpu().clamp(0, 1) for r in rows]), nrow=ncol,
                     padding=PAD, pad_value=1.0)
    img = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    if labels:
        font = ImageFont.load_default()
        width = max(int(ImageDraw.Draw(img).textlength(t, font=font)) for t in labels) + 8
        canvas = Image.new("RGB", (img.width + width, img.height), "white")
        canvas.paste(img, (width, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = rows[0].shape[-2] + PAD
        for i, text in enumerate(labels):
            draw.text((4, PAD + i * row_h + row_h // 2 - 6), text, fill="black", font=font)
        img = canvas
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The AE's output, or the VAE's deterministic reconstruction decode(mu)."""
    if isinstance(model, VAE):
        return model.decode(model.encode(x)[0])
    return model(x)


@torch.no_grad()
def reconstructions(model: torch.nn.Module, x: torch.Tensor, path: str | os.PathLike) -> Path:
    """Originals (top row) above their reconstructions (bottom row)."""
    return save_rows([x, reconstruct(model, x)], path, ["original", "reconstruction"])


SAMPLE_TEMPERATURES = (1.0, 0.7)


@torch.no_grad()
def samples(model: VAE, path: str | os.PathLike, n: int = 32, seed: int = 0,
            temperatures: Sequence[float] = SAMPLE_TEMPERATURES) -> Path:
    """n draws from the prior, 8 per row, each row decoded at every temperature (rows labelled "T = 1",
    "T = 0.7"): the same z at a lower temperature shows what the noise of the T = 1 samples hides."""
    device = next(model.parameters()).device
    # the same draws at every temperature: each starts the generator afresh
    by_t = [model.sample(n, generator=torch.Generator(device=device).manual_seed(seed), temperature=t).split(8)
            for t in temperatures]
    rows = [images[k] for k in range(len(by_t[0])) for images in by_t]
    return save_rows(rows, path, [f"T = {t:g}" for _ in by_t[0] for t in temperatures])


@torch.no_grad()
def interpolation(model: VAE, x: torch.Tensor, path: str | os.PathLike, steps: int = 8) -> Path:
    """For pairs of faces (x[0], x[1]), (x[2], x[3]), ...: a row original a, decode((1-t) mu_a + t mu_b), original b."""
    mu = model.encode(x)[0]
    t = torch.linspace(0, 1, steps, device=mu.device).view(-1, 1)
    rows = []
    for a in range(0, x.shape[0] - 1, 2):
        z = (1 - t) * mu[a] + t * mu[a + 1]
        rows.append(torch.cat([x[a : a + 1], model.decode(z), x[a + 1 : a + 2]]))
    return save_rows(rows, path)


@torch.no_grad()
def attribute_vectors(model: VAE, loader: Iterable[dict], accelerator: Any, max_images: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per attribute: mean mu of faces with it minus mean mu of faces without it (40 x latent_dim).

    One pass over ``loader`` (every rank must call it; sums are reduced over ranks), stopping after about
    max_images images in all. Returns (vectors, count_with, count_without), or None if batches carry no "attr".
    """
    sums = counts = None
    seen = 0
    per_step = None
    for batch in loader:
        if "attr" not in batch:
            return None
        w = batch["valid"].float()
        with accelerator.autocast():
            mu = model.encode(batch["image"])[0].float()
        pos = (batch["attr"] > 0).float() * w[:, None]  # B x 40
        neg = (batch["attr"] < 0).float() * w[:, None]
        part = torch.stack([pos.T @ mu, neg.T @ mu])  # 2 x 40 x latent
        cnt = torch.stack([pos.sum(0), neg.sum(0)])  # 2 x 40
        sums = part if sums is None else sums + part
        counts = cnt if counts is None else counts + cnt
        per_step = per_step or batch["image"].shape[0] * accelerator.num_processes
        seen += per_step
        if max_images is not None and seen >= max_images:
            break  # the same number of batches on every rank, since all ranks see equal batch counts
    if sums is None:
        return None
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.clone(), reduction="sum")
        counts = accelerator.reduce(counts.clone(), reduction="sum")
    means = sums / counts.clamp(min=1)[..., None]
    return means[0] - means[1], counts[0], counts[1]


@torch.no_grad()
def attribute_edits(model: VAE, x: torch.Tensor, vectors: dict[str, torch.Tensor], path: str | os.PathLike,
                    scale: float = 1.0) -> Path:
    """Rows: originals, decode(mu), then decode(mu + scale * vector) for each named attribute vector."""
    mu = model.encode(x)[0]
    rows, labels = [x, model.decode(mu)], ["original", "reconstruction"]
    for name, vec in vectors.items():
        rows.append(model.decode(mu + scale * vec.to(mu)))
        labels.append(f"+{name}")
    return save_rows(rows, path, labels)


# Attribute vectors drawn in attributes.png
PICTURE_ATTRIBUTES = ("Smiling", "Eyeglasses")


def write_pictures(args: Any, accelerator: Any, model: torch.nn.Module, test_loader: Any, attr_loader: Any,
                   attr_names: list[str], out: Path, log: Any) -> list[str]:
    """Write a run's PNGs into ``out`` (train.py; every rank calls this: the attribute vectors need all
    ranks); returns the file names. ``args``: train.py's (attr_images, loader, seed); ``log``: one line."""
    vectors: dict[str, torch.Tensor] = {}
    if isinstance(model, VAE):
        found = attribute_vectors(model, attr_loader, accelerator, args.attr_images)
        if found is None:
            log(f"note: the {args.loader} loader gives no 'attr' labels; skipping attributes.png")
        else:
            vecs, n_with, n_without = found
            for name in PICTURE_ATTRIBUTES:
                if name not in attr_names:
                    log(f"note: the shards have no attribute {name}; attributes.png leaves it out")
                    continue
                i = attr_names.index(name)
                if n_with[i] == 0 or n_without[i] == 0:
                    log(f"note: no training face {'with' if n_with[i] == 0 else 'without'} {name}; "
                        f"attributes.png leaves it out")
                    continue
                vectors[name] = vecs[i]
    written: list[str] = []
    if accelerator.is_main_process:
        faces = None
        for batch in test_loader:
            faces = batch["image"][batch["valid"]][:8]
            break
        if faces is None or faces.shape[0] == 0:
            log("note: the test split is empty; no pictures")
            return written
        with accelerator.autocast():
            written.append(reconstructions(model, faces, out / "reconstructions.png").name)
            if isinstance(model, VAE):
                written.append(samples(model, out / "samples.png", seed=args.seed).name)
                if faces.shape[0] >= 2:
                    written.append(interpolation(model, faces, out / "interpolation.png").name)
                if vectors:
                    written.append(attribute_edits(model, faces, vectors, out / "attributes.png").name)
    return written
