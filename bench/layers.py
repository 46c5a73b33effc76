#!/usr/bin/env python
"""Each layer of the AE and VAE against the machine's arithmetic: milliseconds and GFLOP/s.

    python bench/layers.py                       # both models, channels-last (train.py's default)
    python bench/layers.py --models ae --layout contiguous --json runs/bench/layers-nchw.json

For every Conv2d, ConvTranspose2d and Linear layer, on the input shape it gets in a forward pass at
--batch-size: its forward and its backward (gradients of the weights, and of the input except for
the first layer, whose input is the data) timed alone, medians of --repeats after warm-up, and the
multiply-adds those take counted from the shapes (2 FLOP each). The last rows time the whole
training step (forward, the notebook's loss, backward, Adam) the same way: what the layers leave
to the rest (activations, loss, optimizer, autograd) is the difference. Writes --json with the
machine beside the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fastceleba.files import write_json  # noqa: E402
from fastceleba.models import build_model  # noqa: E402
from fastceleba.train_loop import compute_loss  # noqa: E402
# a sibling bench script (running one puts bench/ first on sys.path)
from loader import machine  # noqa: E402

LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def forward_flop(layer: nn.Module, x: torch.Tensor) -> int:
    """FLOP of one forward pass of ``layer`` on ``x`` (2 per multiply-add; bias ignored)."""
    if isinstance(layer, nn.Linear):
        return 2 * x.shape[0] * layer.in_features * layer.out_features
    kernel = layer.weight.shape[2] * layer.weight.shape[3]
    if isinstance(layer, nn.ConvTranspose2d):  # every input pixel meets every output channel's kernel
        return 2 * x.numel() * layer.out_channels * kernel // layer.groups
    out = layer(x)  # Conv2d: every output pixel sums a kernel over the input channels
    return 2 * out.numel() * (layer.in_channels // layer.groups) * kernel


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layer_rows(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> list[dict]:
    inputs: dict[str, torch.Tensor] = {}  # in the order the forward pass meets the layers

    def keep(layer_name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:  # None: the output stays
            inputs.setdefault(layer_name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, LAYERS)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    modules = dict(model.named_modules())
    for i, (layer_name, inp) in enumerate(inputs.items()):
        layer = modules[layer_name]
        inp = inp.clone().requires_grad_(i > 0)  # the first layer's input is the data: no gradient
        out = layer(inp)
        grad = torch.ones_like(out)
        fwd = forward_flop(layer, inp)
        bwd = fwd * (2 if i > 0 else 1)  # weight gradient, and the input's

        def backward() -> None:
            layer.zero_grad(set_to_none=True)
            layer(inp).backward(grad)

        f_ms = median_ms(lambda: layer(inp), repeats)
        fb_ms = median_ms(backward, repeats)
        b_ms = max(fb_ms - f_ms, 1e-6)
        rows.append({"model": name, "layer": layer_name, "kind": type(layer).__name__,
                     "input": list(inp.shape), "forward_ms": f_ms, "backward_ms": b_ms,
                     "gflop": (fwd + bwd) / 1e9, "forward_gflop_s": fwd / f_ms / 1e6,
                     "backward_gflop_s": bwd / b_ms / 1e6})
    return rows


def step_ms(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # tiny steps: the model stays as it is

    def step() -> None:
        loss, _ = compute_loss(model, x, name, 1.0, reduction="image")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_ms(step, repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ae,vae", help="comma list: ae, vae (default both)")
    p.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last",
                   help="memory layout of weights and batches (default channels_last, train.py's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128, the notebook's)")
    p.add_argument("--repeats", type=int, default=12, help="timed runs of each layer and step (default 12)")
    p.add_argument("--json", type=Path, default=Path("runs/bench/layers.json"),
                   help="write the report here (default runs/bench/layers.json)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in ("ae", "vae") for m in models) or args.batch_size < 1 or args.repeats < 1:
        p.error("--models takes ae and/or vae; --batch-size and --repeats must be >= 1")
    torch.manual_seed(0)
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    report = {"machine": machine(), "layout": args.layout, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "layers": [], "steps": {}}
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU: none (CPU timing), torch {m['torch']}; "
          f"{args.layout}, batch {args.batch_size}, medians of {args.repeats}")
    print(f"{'layer':22} {'input':18} {'fwd ms':>7} {'bwd ms':>7} {'GFLOP':>6} {'fwd GFLOP/s':>11} "
          f"{'bwd GFLOP/s':>11}")
    for name in models:
        model = build_model(name).to(memory_format=layout)
        x = torch.rand(args.batch_size, 3, 64, 64).contiguous(memory_format=layout)
        rows = layer_rows(name, model, x, args.repeats)
        report["layers"] += rows
        for r in rows:
            print(f"{name + ' ' + r['layer']:22} {'x'.join(map(str, r['input'][1:])):18} {r['forward_ms']:7.2f} "
                  f"{r['backward_ms']:7.2f} {r['gflop']:6.2f} {r['forward_gflop_s']:11.0f} "
                  f"{r['backward_gflop_s']:11.0f}")
        ms = step_ms(name, model, x, args.repeats)
        in_layers = sum(r["forward_ms"] + r["backward_ms"] for r in rows)
        gflop = sum(r["gflop"] for r in rows)
        report["steps"][name] = {"step_ms": ms, "layers_ms": in_layers, "gflop": gflop}
        print(f"{name} step: {ms:.1f} ms ({gflop:.1f} GFLOP in its layers, {gflop / ms * 1e3:.0f} GFLOP/s over "
              f"the step); the layers alone {in_layers:.1f} ms")
    write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
