"""Model health (fastceleba/health.py) on constructed models, and the recipes' schedules.

The end-to-end checks (the notebook recipe's collapse is reported, the default recipe's is not) run the
real training script in tests/test_train.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from fastceleba import health
from fastceleba.metrics import evaluate
from fastceleba.models import VAE, Autoencoder
from fastceleba.recipe import DEFAULT_AE, DEFAULT_VAE, NOTEBOOK, Recipe, resolve


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def batches(n: int = 3, size: int = 8, seed: int = 0, pad: int = 0) -> list[dict]:
    """Random images in [0, 1]; the last `pad` samples of the last batch are padding (valid=False)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        valid = torch.ones(size, dtype=torch.bool)
        if i == n - 1 and pad:
            valid[-pad:] = False
        out.append({"image": torch.rand(size, 3, 64, 64, generator=gen), "valid": valid})
    return out


def test_relu_layers_are_named_as_in_the_state_dict():
    assert list(health.relu_layers(VAE(8))) == ["enc_conv1", "enc_conv2", "enc_conv3", "dec_conv1", "dec_conv2"]
    ae = Autoencoder()
    assert list(health.relu_layers(ae)) == ["encoder.0", "encoder.2", "decoder.0", "decoder.2"]
    assert all(f"{n}.weight" in ae.state_dict() for n in health.relu_layers(ae))


@torch.no_grad()
def test_known_dead_channels_are_counted_exactly(accelerator):
    torch.manual_seed(0)
    model = VAE(8)
    model.enc_conv3.bias.fill_(1e3)       # every unit of enc_conv3 positive ...
    model.enc_conv3.bias[:10] = -1e3      # ... except 10 of 64 channels, on every image
    model.dec_conv2.bias.fill_(-1e3)      # a whole layer dead
    m = evaluate(model, batches(), accelerator, baseline=torch.full((3, 64, 64), 0.5))
    assert m["dead_fraction"]["enc_conv3"] == pytest.approx(10 / 64)
    assert m["dead_fraction"]["dec_conv2"] == 1.0
    assert m["dead_channel_fraction"]["enc_conv3"] == pytest.approx(10 / 64)
    assert m["dead_channel_fraction"]["dec_conv2"] == 1.0
    problems = health.problems(m)
    assert any("100% of dec_conv2's units are dead" in p for p in problems)
    assert not any("enc_conv3" in p for p in problems)  # 16 % dead is not a collapse


@torch.no_grad()
def test_vae_decoder_units_are_judged_on_posterior_draws(accelerator):
    """A dec_conv1 unit that is negative on the mean decode z = mu but fires on z ~ q(z|x), the decoder's
    training input, gets gradient: it is not dead."""
    torch.manual_seed(0)
    model = VAE(8)
    for layer in (model.fc_mu, model.fc_logvar):
        layer.weight.zero_()
        layer.bias.zero_()                # mu = 0 and sigma = 1 for every image
    model.dec_fc.bias.zero_()             # so the mean decode feeds dec_conv1 zeros ...
    model.dec_conv1.bias.fill_(-0.05)     # ... and every dec_conv1 unit is at -0.05 there
    m = evaluate(model, batches(), accelerator, baseline=torch.full((3, 64, 64), 0.5))
    assert m["dead_fraction"]["dec_conv1"] < 0.5   # 1.0 if judged on decode(mu)
    assert m["active_units"] == 0                   # mu carries nothing, whatever the draws do


@torch.no_grad()
def test_padding_samples_do_not_keep_a_unit_alive():
    torch.manual_seed(0)
    model = Autoencoder()
    data = batches(n=1, size=4, pad=1)
    data[0]["image"][:3] = 0.0            # valid images: all zero -> conv output = bias
    data[0]["image"][3] = 1.0             # the padding sample: would make units positive
    model.encoder[0].bias.fill_(-1.0)     # so on valid images every encoder.0 unit is dead
    model.encoder[0].weight.fill_(1.0)
    with health.DeadUnitProbe(model) as probe:
        for b in data:
            probe.valid = b["valid"]
            model(b["image"])
    alive = probe.alive_counts()
    assert health.dead_fractions(alive)["encoder.0"] == 1.0
    probe2 = health.DeadUnitProbe(model)
    with probe2:
        model(data[0]["image"])           # without a mask the padding sample counts
    assert health.dead_fractions(probe2.alive_counts())["encoder.0"] < 1.0


@torch.no_grad()
def test_constant_mu_has_no_active_units_and_is_a_collapse(accelerator):
    torch.manual_seed(0)
    model = VAE(16)
    model.fc_mu.weight.zero_()            # mu(x) = bias for every x: nothing about the image gets through
    m = evaluate(model, batches(), accelerator, baseline=torch.full((3, 64, 64), 0.5))
    assert m["active_units"] == 0 and m["latent_dim"] == 16
    assert any("only 0/16 latents active" in p for p in health.problems(m))
    line = health.warning_line(health.problems(m), "valid", "notebook")
    assert line.startswith("warning: the model collapsed on the valid split: ") and "\n" not in line
    assert "drop --recipe notebook" in line


def test_active_units_counts_variance_above_threshold():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    scales = torch.tensor([0.0, 0.05, 0.2, 1.0])  # variances 0, 0.0025, 0.04, 1 -> 2 active
    mu = torch.randn(n, 4, generator=gen, dtype=torch.float64) * scales + 3.0
    count, var = health.active_units(mu.sum(0), mu.pow(2).sum(0), n)
    assert count == 2
    assert var.tolist() == pytest.approx([0.0, 0.0025, 0.04, 1.0], rel=0.05, abs=1e-9)


def test_problems_of_a_healthy_model_are_empty():
    metrics = {"num_samples": 10, "psnr": 23.0, "baseline_psnr": 13.0, "psnr_gain": 10.0, "active_units": 80,
               "latent_dim": 80, "dead_fraction": {"enc_conv3": 0.05}}
    assert health.problems(metrics) == []
    metrics.update(psnr=13.5, psnr_gain=0.5)
    assert health.problems(metrics) == ["PSNR 13.50 dB is within 1 dB of the mean image's 13.00 dB"]


def test_recipe_schedules():
    assert [NOTEBOOK.lr_at(s, 100) for s in (0, 50, 99)] == [1e-3] * 3
    assert NOTEBOOK.beta_at(0, 100) == 1.0 and NOTEBOOK.reduction == "sum" and NOTEBOOK.init == "torch"
    r = Recipe("t", lr=1.0, warmup_steps=10, decay="cosine", final_lr=0.1, kl_warmup_steps=20)
    assert r.lr_at(0, 110) == pytest.approx(0.1) and r.lr_at(9, 110) == pytest.approx(1.0)
    assert r.lr_at(10, 110) == pytest.approx(1.0) and r.lr_at(109, 110) == pytest.approx(0.1)
    assert r.lr_at(60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert r.beta_at(0, 110) == pytest.approx(0.05) and r.beta_at(19, 110) == 1.0 and r.beta_at(500, 110) == 1.0
    assert r.warmups(20) == (6, 12) and r.lr_at(5, 20) == pytest.approx(1.0)  # short runs: capped warm-ups
    assert r.beta_at(11, 20) == 1.0
    lin = resolve("default", "vae", decay="linear", final_lr=0.0, warmup_steps=0)
    assert lin.lr_at(0, 11) == pytest.approx(DEFAULT_VAE.lr) and lin.lr_at(10, 11) == pytest.approx(0.0)
    assert resolve("notebook", "vae", lr=None).lr == 1e-3  # None leaves the recipe's value
    # one recipe name, a schedule per model: the AE's faster one, the notebook's the same for both
    assert resolve("default", "ae") == DEFAULT_AE and DEFAULT_AE.lr > DEFAULT_VAE.lr
    assert resolve("notebook", "ae") == resolve("notebook", "vae") == NOTEBOOK


def test_recipe_clipping_and_adam_flags():
    from fastceleba.recipe import recipe_from_args
    from fastceleba.train import parse_args
    assert NOTEBOOK.clip_grad_norm == 0 and NOTEBOOK.adam_eps == 1e-8  # the notebook: no clipping, Adam's eps
    d = ["--data", "shards"]
    r = recipe_from_args(parse_args(d + ["--clip-grad-norm", "5", "--adam-eps", "1e-6"]))
    assert r.clip_grad_norm == 5 and r.adam_eps == 1e-6 and r.lr == DEFAULT_VAE.lr
    # Adam's beta2: PyTorch's 0.999 but in the AE's default, one flag to change
    assert NOTEBOOK.adam_beta2 == DEFAULT_VAE.adam_beta2 == 0.999 and DEFAULT_AE.adam_beta2 == 0.95
    assert recipe_from_args(parse_args(d + ["--recipe", "notebook", "--adam-beta2", "0.9"])).adam_beta2 == 0.9
    assert recipe_from_args(parse_args(d + ["--model", "ae"])) == DEFAULT_AE
    assert recipe_from_args(parse_args(d + ["--logvar-bias", "-3", "--output-bias", "init"])).logvar_bias == -3
    assert recipe_from_args(parse_args(d + ["--recipe", "notebook", "--clip-grad-norm", "0"])).clip_grad_norm == 0
    assert recipe_from_args(parse_args(d + ["--free-bits", "0.5"])).free_bits == 0.5 and NOTEBOOK.free_bits == 0
    for bad in (["--clip-grad-norm", "-1"], ["--adam-eps", "0"], ["--free-bits", "-0.1"], ["--logvar-bias", "nan"],
                ["--output-bias", "zero"], ["--adam-beta2", "1"], ["--adam-beta2", "0"]):
        with pytest.raises(SystemExit):
            parse_args(d + bad)


def test_free_bits_floor_the_kl_gradient_but_not_the_reported_loss():
    from fastceleba.train import compute_loss
    torch.manual_seed(0)
    model, x = VAE(latent_dim=8), torch.rand(4, 3, 64, 64)
    torch.manual_seed(1)
    plain = compute_loss(model, x, "vae", 1.0, "image")
    torch.manual_seed(1)
    floored = compute_loss(model, x, "vae", 1.0, "image", free_bits=100.0)
    assert floored[1] == plain[1]  # the same reported loss
    torch.manual_seed(1)
    no_kl = compute_loss(model, x, "vae", 0.0, "image")
    # every latent's KL is under a 100-nat floor: the KL term is a constant, 8 latents x 100 nats
    assert floored[0].item() == pytest.approx(no_kl[0].item() + 800.0, rel=1e-5)


def test_centred_init_gives_every_relu_unit_zero_sum_weights():
    from fastceleba.recipe import initialize
    torch.manual_seed(0)
    model = initialize(VAE(latent_dim=8), "centred")
    layers = health.relu_layers(model)
    assert layers  # the layers feeding a ReLU
    for name, layer in layers.items():
        w = layer.weight.transpose(0, 1) if isinstance(layer, torch.nn.ConvTranspose2d) else layer.weight
        assert w.flatten(1).sum(1).abs().max() < 1e-4, name
        assert (layer.bias == 0).all()
    conv1 = model.enc_conv1.weight
    fan_in = conv1[0].numel()
    assert conv1.var().item() == pytest.approx(2 / fan_in, rel=0.2)  # He's variance kept
    # images are >= 0: a flat grey image gives every first-layer unit a pre-activation of 0, not +-level
    assert model.enc_conv1(torch.full((1, 3, 64, 64), 0.5))[..., 2:-2, 2:-2].abs().max() < 1e-4


def test_logvar_bias_sets_the_posteriors_initial_variance():
    from fastceleba.recipe import initialize
    torch.manual_seed(0)
    model = initialize(VAE(latent_dim=8), "centred", logvar_bias=-6.0)
    assert (model.fc_logvar.bias == -6.0).all() and (model.fc_mu.bias == 0).all()
    _, logvar = model.encode(torch.rand(4, 3, 64, 64))
    assert logvar.mean().item() == pytest.approx(-6.0, abs=0.5)  # sigma ~0.05 at step 0, not 1
    # "torch" keeps PyTorch's weights but still takes the bias; the AE has no posterior
    torch.manual_seed(0)
    torch_init = initialize(VAE(latent_dim=8), "torch", logvar_bias=-6.0)
    torch.manual_seed(0)
    assert torch.equal(torch_init.fc_mu.weight, VAE(latent_dim=8).fc_mu.weight)
    assert (torch_init.fc_logvar.bias == -6.0).all()
    initialize(Autoencoder(), "centred", logvar_bias=-6.0)


@pytest.mark.parametrize("name", ["vae", "ae"])
def test_icnr_starts_the_upsampling_layers_without_a_checkerboard(name):
    from fastceleba.models import build_model
    from fastceleba.recipe import initialize
    flat = torch.rand(1, 16, 1, 1).expand(1, 16, 32, 32)  # a smooth (constant) input to the 3x3 stride-2 layers
    for icnr in (False, True):
        torch.manual_seed(0)
        model = initialize(build_model(name, 8), "centred", logvar_bias=-6.0 if name == "vae" else None, icnr=icnr)
        up = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2)]
        assert len(up) == 2
        with torch.no_grad():
            y = up[-1](flat)[0, :, 2:-2, 2:-2]  # the last layer: 16 -> 3 channels, 64 x 64
            spread = (y.amax((1, 2)) - y.amin((1, 2))).max().item()
        if not icnr:
            assert spread > 0.1  # the period-2 pattern this init removes
            reference = [m.weight.std().item() for m in up]
        else:
            assert spread < 1e-5  # constant in, constant out: nearest-neighbour upsampling
            for m, std in zip(up, reference):  # the output scale of the init it replaces
                assert m.weight.std().item() == pytest.approx(std, rel=0.25)
            first = up[0].weight.transpose(0, 1).flatten(1).sum(1)  # feeds a ReLU: still zero-sum
            assert first.abs().max() < 1e-4


@pytest.mark.parametrize("name", ["vae", "ae"])
def test_output_bias_starts_reconstructions_at_the_mean_colour(name):
    from fastceleba.models import build_model
    from fastceleba.recipe import initialize, set_output_bias
    torch.manual_seed(0)
    model = initialize(build_model(name, 8), "centred", logvar_bias=-6.0)
    x = torch.rand(16, 3, 64, 64) * torch.tensor([0.9, 0.5, 0.1]).view(1, 3, 1, 1)  # mean colour 0.45/0.25/0.05
    target = x.mean((0, 2, 3))

    def first_output_colour():
        with torch.no_grad():
            out = model(x)
        return (out[0] if isinstance(out, tuple) else out).mean((0, 2, 3))

    before = (first_output_colour() - target).abs().max()
    set_output_bias(model, target)
    last = model.dec_conv3 if name == "vae" else model.decoder[-2]
    assert torch.allclose(last.bias, torch.logit(target))
    after = (first_output_colour() - target).abs().max()
    assert before > 0.15 and after < 0.05, (before, after)  # from ~0.5 grey to the data's colour


def test_gradient_centralization_keeps_the_weight_sum_of_units_with_rectified_inputs():
    from fastceleba.recipe import centralize_gradients, initialize, rectified_input_layers
    from fastceleba.train import compute_loss
    torch.manual_seed(0)
    model = initialize(VAE(latent_dim=8), "centred", logvar_bias=-6.0)
    x = torch.rand(4, 3, 64, 64)
    compute_loss(model, x, "vae", 1.0, "image")[0].backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    centralize_gradients(model)
    layers = rectified_input_layers(model)
    assert sorted(layers) == ["dec_conv2", "enc_conv1", "enc_conv2", "enc_conv3"]  # dec_conv1 takes dec_fc(z)
    for name, layer in layers.items():
        g = layer.weight.grad.transpose(0, 1) if isinstance(layer, torch.nn.ConvTranspose2d) else layer.weight.grad
        assert g.flatten(1).sum(1).abs().max() < 1e-5 * before[f"{name}.weight"].abs().sum(), name
        assert not torch.equal(layer.weight.grad, before[f"{name}.weight"])  # it did change something
        assert torch.equal(layer.bias.grad, before[f"{name}.bias"])  # biases keep moving the level
    for name in ("fc_mu.weight", "fc_logvar.weight", "dec_fc.weight", "dec_conv1.weight", "dec_conv3.weight"):
        assert torch.equal(dict(model.named_parameters())[name].grad, before[name]), name
    # plain gradient steps then keep the centred init's zero sums exactly
    with torch.no_grad():
        for layer in layers.values():
            layer.weight -= 0.1 * layer.weight.grad
    conv3 = model.enc_conv3.weight
    assert conv3.flatten(1).sum(1).abs().max() < 1e-4
