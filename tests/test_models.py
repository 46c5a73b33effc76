"""fastceleba.models: the notebook's layers pinned, shapes, losses, logvar clamp, safetensors round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from fastceleba.errors import DataError
from fastceleba.models import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    Z_MAX,
    MODELS,
    VAE,
    Autoencoder,
    ae_loss,
    build_model,
    count_parameters,
    load_pretrained,
    save_pretrained,
    vae_loss,
)


def layers(model: nn.Module) -> list[tuple]:
    """(name, type, hyperparameters) for every leaf module, in registration order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ConvTranspose2d):
            out.append((name, "ConvTranspose2d", m.in_channels, m.out_channels, m.kernel_size, m.stride,
                        m.padding, m.output_padding))
        elif isinstance(m, nn.Conv2d):
            out.append((name, "Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding))
        elif isinstance(m, nn.Linear):
            out.append((name, "Linear", m.in_features, m.out_features, m.bias is not None))
        elif name and not isinstance(m, nn.Sequential):
            out.append((name, type(m).__name__))
    return out


def test_autoencoder_layers_match_notebook():
    assert layers(Autoencoder()) == [
        ("encoder.0", "Conv2d", 3, 16, (3, 3), (2, 2), (1, 1)),
        ("encoder.1", "ReLU"),
        ("encoder.2", "Conv2d", 16, 32, (3, 3), (2, 2), (1, 1)),
        ("encoder.3", "ReLU"),
        ("encoder.4", "Conv2d", 32, 64, (7, 7), (1, 1), (0, 0)),
        ("decoder.0", "ConvTranspose2d", 64, 32, (7, 7), (1, 1), (0, 0), (0, 0)),
        ("decoder.1", "ReLU"),
        ("decoder.2", "ConvTranspose2d", 32, 16, (3, 3), (2, 2), (1, 1), (1, 1)),
        ("decoder.3", "ReLU"),
        ("decoder.4", "ConvTranspose2d", 16, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
        ("decoder.5", "Sigmoid"),
    ]


@pytest.mark.parametrize("latent", [80, 40])
def test_vae_layers_match_notebook(latent):
    assert layers(VAE(latent)) == [
        ("enc_conv1", "Conv2d", 3, 16, (3, 3), (2, 2), (1, 1)),
        ("enc_conv2", "Conv2d", 16, 32, (3, 3), (2, 2), (1, 1)),
        ("enc_conv3", "Conv2d", 32, 64, (7, 7), (1, 1), (0, 0)),
        ("fc_mu", "Linear", 6400, latent, True),
        ("fc_logvar", "Linear", 6400, latent, True),
        ("dec_fc", "Linear", latent, 6400, True),
        ("dec_conv1", "ConvTranspose2d", 64, 32, (7, 7), (1, 1), (0, 0), (0, 0)),
        ("dec_conv2", "ConvTranspose2d", 32, 16, (3, 3), (2, 2), (1, 1), (1, 1)),
        ("dec_conv3", "ConvTranspose2d", 16, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    ]


# The notebook's classes, transcribed verbatim (latent_dim is a global there), as the reference.
latent_dim = 80


class NotebookAutoencoder(nn.Module):
    def __init__(self):
        super(NotebookAutoencoder, self).__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 7))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 7), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


class NotebookVAE(nn.Module):
    def __init__(self):
        super(NotebookVAE, self).__init__()
        self.enc_conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.enc_conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.enc_conv3 = nn.Conv2d(32, 64, 7)
        self.fc_mu = nn.Linear(in_features=64*10*10, out_features=latent_dim)
        self.fc_logvar = nn.Linear(in_features=64*10*10, out_features=latent_dim)
        self.dec_fc = nn.Linear(in_features=latent_dim, out_features=64*10*10)
        self.dec_conv1 = nn.ConvTranspose2d(64, 32, 7)
        self.dec_conv2 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
        self.dec_conv3 = nn.ConvTranspose2d(16, 3, 3, stride=2, padding=1, output_padding=1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5*logvar)
        eps = torch.randn_like(std)
        return mu + eps*std

    def encode(self, x):
        x = torch.nn.functional.relu(self.enc_conv1(x))
        x = torch.nn.functional.relu(self.enc_conv2(x))
        x = torch.nn.functional.relu(self.enc_conv3(x))
        x = x.view(x.size(0), -1)
        return self.fc_mu(x), self.fc_logvar(x)

    def decode(self, z):
        z = self.dec_fc(z)
        z = z.view(z.size(0), 64, 10, 10)
        z = torch.nn.functional.relu(self.dec_conv1(z))
        z = torch.nn.functional.relu(self.dec_conv2(z))
        return torch.sigmoid(self.dec_conv3(z))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def test_weights_interchange_with_notebook_classes():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    ours, ref = Autoencoder(), NotebookAutoencoder()
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    ours, ref = VAE(), NotebookVAE()
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(ours.encode(x), ref.encode(x)):
            assert torch.equal(a, b)
        torch.manual_seed(1)
        recon_ours, _, _ = ours(x)
        torch.manual_seed(1)  # same eps draw in both reparameterizations
        recon_ref, _, _ = ref(x)
        assert torch.equal(recon_ours, recon_ref)
        z = 3 * torch.randn(3, 80)
        assert torch.equal(ours.decode(z), ref.decode(z))


def test_parameter_counts():
    # By hand from the notebook's layers (weights + biases):
    #   convs: 3*16*9+16=448, 16*32*9+32=4640, 32*64*49+64=100416            -> 105504
    #   transposed: 64*32*49+32=100384, 32*16*9+16=4624, 16*3*9+3=435        -> 105443
    #   VAE linears, latent L: 2*(6400*L+L) + (L*6400+6400)
    #     L=80: 512080*2 + 518400 = 1542560;  L=40: 256040*2 + 262400 = 774480
    assert count_parameters(Autoencoder()) == 210_947
    assert count_parameters(VAE()) == 1_753_507
    assert count_parameters(VAE(80)) == 1_753_507
    assert count_parameters(VAE(40)) == 985_427
    assert VAE().latent_dim == 80


def test_build_model():
    assert MODELS == ("ae", "vae")
    assert isinstance(build_model("ae"), Autoencoder)
    vae = build_model("vae", latent_dim=16)
    assert isinstance(vae, VAE) and vae.fc_mu.out_features == 16
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gan")


def test_autoencoder_shapes_and_range():
    torch.manual_seed(0)
    model, x = Autoencoder(), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model.encoder(x).shape == (2, 64, 10, 10)
        out = model(x)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_vae_shapes_and_range():
    torch.manual_seed(0)
    model, x = VAE(), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        recon, mu, logvar = model(x)
        assert model.decode(torch.zeros(5, 80)).shape == (5, 3, 64, 64)
    assert recon.shape == (2, 3, 64, 64)
    assert mu.shape == (2, 80) and logvar.shape == (2, 80)
    assert recon.min() >= 0 and recon.max() <= 1
    assert VAE(40).encode(x)[0].shape == (2, 40)


def test_vae_sample_uses_generator():
    model = VAE(8)
    a = model.sample(3, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    c = model.sample(3, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 64, 64) and not a.requires_grad
    assert torch.equal(a, b) and not torch.equal(a, c)
    # It is decode() of the generator's N(0, I) draws.
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a, model.decode(z))
        # At temperature T the same draws, scaled: z ~ N(0, T^2 I).
        cold = model.sample(3, generator=torch.Generator().manual_seed(1), temperature=0.5)
        assert torch.equal(cold, model.decode(0.5 * z)) and not torch.equal(cold, a)


def test_ae_loss_hand_computed():
    recon = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    x = torch.tensor([[[[0.5, 0.5], [0.0, 0.75]]]])
    # squared errors 0.25, 0, 1, 0.25 -> mean 1.5 / 4
    loss = ae_loss(recon, x)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.375, abs=1e-7)


def test_vae_loss_zero_kld_and_mse_sum():
    x = torch.full((2, 3, 4, 4), 0.5)
    recon = torch.full((2, 3, 4, 4), 0.25)
    zeros = torch.zeros(2, 80)
    loss, mse, kld = vae_loss(recon, x, zeros, zeros)
    assert kld.item() == 0.0
    assert mse.item() == pytest.approx(96 * 0.0625)  # 96 elements, each (0.25)^2, summed
    assert loss.item() == mse.item()


def test_vae_loss_closed_form_and_beta():
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.full((1, 12), 0.5)  # flat recon is reshaped to x's shape, as in the notebook
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # KLD = -0.5 * [(1 + 0 - 1 - 1) + (1 + ln2 - 0 - 2)] = 1 - ln2 / 2
    expected_kld = 1 - math.log(2.0) / 2
    loss, mse, kld = vae_loss(recon, x, mu, logvar)
    assert kld.item() == pytest.approx(expected_kld, rel=1e-6)
    assert mse.item() == pytest.approx(12 * 0.25)
    assert loss.item() == pytest.approx(3.0 + expected_kld, rel=1e-6)
    loss4, mse4, kld4 = vae_loss(recon, x, mu, logvar, beta=4.0)
    assert mse4.item() == mse.item() and kld4.item() == kld.item()
    assert loss4.item() == pytest.approx(3.0 + 4 * expected_kld, rel=1e-6)
    assert vae_loss(recon, x, mu, logvar, beta=0.0)[0].item() == pytest.approx(3.0)


def test_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    ae, vae = Autoencoder(), VAE()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recon_ae = ae(x)
        recon, mu, logvar = vae(x)
        assert recon_ae.dtype == torch.bfloat16 and recon.dtype == torch.bfloat16  # autocast really is on
        l_ae = ae_loss(recon_ae, x)
        l_vae, mse, kld = vae_loss(recon, x, mu, logvar)
    assert all(t.dtype == torch.float32 for t in (l_ae, l_vae, mse, kld))
    # Exactly the fp32 computation on the upcast bf16 outputs.
    assert torch.equal(l_ae, ((recon_ae.float() - x) ** 2).mean())
    assert torch.equal(mse, torch.nn.functional.mse_loss(recon.float(), x, reduction="sum"))
    lv, m = logvar.float(), mu.float()
    assert torch.allclose(kld, -0.5 * torch.sum(1 + lv - m.pow(2) - lv.exp()), rtol=1e-6)


def test_logvar_clamp_keeps_exp_finite_in_half_precision():
    torch.manual_seed(0)
    model = VAE(8)
    with torch.no_grad():
        model.fc_logvar.weight.fill_(1e3)  # unclamped logvar would be ~1e5..1e7
        x = torch.rand(2, 3, 64, 64)
        raw = model.fc_logvar(torch.relu(model.enc_conv3(torch.relu(model.enc_conv2(torch.relu(
            model.enc_conv1(x)))))).flatten(1))
        assert raw.max() > 1e4  # the test really drives logvar out of range
        mu, logvar = model.encode(x)
    assert logvar.max().item() == LOGVAR_MAX and logvar.min().item() >= LOGVAR_MIN
    for dtype in (torch.float16, torch.bfloat16):
        std = torch.exp(0.5 * logvar.to(dtype))  # what reparameterize computes in half precision
        assert torch.isfinite(std).all()
        assert torch.isfinite(model.reparameterize(mu.to(dtype), logvar.to(dtype))).all()
    recon = model.decode(mu)
    loss, _, kld = vae_loss(recon, x, mu.half(), logvar.half())
    assert torch.isfinite(loss) and torch.isfinite(kld)
    # Negative side: weights of -1e3 drive logvar to the floor, exp stays positive and finite.
    with torch.no_grad():
        model.fc_logvar.weight.fill_(-1e3)
        _, low = model.encode(x)
    assert low.min().item() == LOGVAR_MIN
    assert torch.isfinite(vae_loss(recon, x, mu, low)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_diverged_encoder_stays_finite_under_half_precision_autocast(dtype):
    """What autocast does: dec_fc takes z in half precision. At logvar 20 (std 22026) a sample with
    |eps| > 2.97 used to overflow fp16 there, so the reconstruction and the loss became inf/NaN."""
    torch.manual_seed(0)
    model = VAE()
    with torch.no_grad():
        model.fc_logvar.weight.zero_()
        model.fc_logvar.bias.fill_(LOGVAR_MAX)
    x = torch.rand(64, 3, 64, 64)
    with torch.autocast("cpu", dtype=dtype):
        recon, mu, logvar = model(x)
        assert recon.dtype == dtype  # autocast really is on
        z = model.reparameterize(mu, logvar)
    assert z.dtype == torch.float32 and z.abs().max() == Z_MAX  # some draws hit the bound
    assert torch.isfinite(recon).all() and torch.isfinite(vae_loss(recon, x, mu, logvar)[0])


def test_logvar_clamp_is_identity_in_range():
    torch.manual_seed(0)
    model, x = VAE(8), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        h = torch.relu(model.enc_conv3(torch.relu(model.enc_conv2(torch.relu(model.enc_conv1(x))))))
        _, logvar = model.encode(x)
        assert torch.equal(logvar, model.fc_logvar(h.flatten(1)))


@pytest.mark.parametrize("name,latent", [("ae", 80), ("vae", 80), ("vae", 40)])
def test_save_load_round_trip(tmp_path, name, latent):
    torch.manual_seed(0)
    model = build_model(name, latent).eval()
    save_pretrained(model, tmp_path / "run", {"epoch": 3, "lr": 1e-3})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded, config = load_pretrained(tmp_path / "run")
    assert type(loaded) is type(model) and not loaded.training
    assert config["model"] == name and config["epoch"] == 3 and config["lr"] == 1e-3
    if name == "vae":
        assert config["latent_dim"] == latent and loaded.latent_dim == latent
    else:
        assert "latent_dim" not in config
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        if name == "vae":
            for a, b in zip(model.encode(x), loaded.encode(x)):
                assert torch.equal(a, b)
            z = torch.randn(2, latent)
            assert torch.equal(model.decode(z), loaded.decode(z))
        else:
            assert torch.equal(model(x), loaded(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_save_overwrites_and_config_cannot_contradict(tmp_path):
    save_pretrained(VAE(8), tmp_path, {})
    second = VAE(8)
    save_pretrained(second, tmp_path, {"note": "second"})
    loaded, config = load_pretrained(tmp_path)
    assert config["note"] == "second"
    assert torch.equal(loaded.fc_mu.weight, second.fc_mu.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    with pytest.raises(ValueError, match="latent_dim"):
        save_pretrained(VAE(8), tmp_path / "bad", {"latent_dim": 80})
    assert not (tmp_path / "bad" / "config.json").exists()


def rewrite_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_load_other_latent_dim_is_data_error(tmp_path):
    save_pretrained(VAE(40), tmp_path, {})
    rewrite_config(tmp_path, latent_dim=80)
    with pytest.raises(DataError) as info:
        load_pretrained(tmp_path)
    message = str(info.value)
    assert "model.safetensors" in message and "latent_dim=40" in message and "80" in message
    assert "\n" not in message


def test_load_other_model_is_data_error(tmp_path):
    save_pretrained(Autoencoder(), tmp_path / "ae", {})
    rewrite_config(tmp_path / "ae", model="vae", latent_dim=80)
    with pytest.raises(DataError, match=r"model\.safetensors.*'ae'.*'vae'"):
        load_pretrained(tmp_path / "ae")
    save_pretrained(VAE(8), tmp_path / "vae", {})
    rewrite_config(tmp_path / "vae", model="ae")
    with pytest.raises(DataError, match=r"model\.safetensors.*'vae'.*'ae'"):
        load_pretrained(tmp_path / "vae")


def test_missing_and_malformed_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="config.json: missing"):
        load_pretrained(tmp_path / "nowhere")
    save_pretrained(VAE(8), tmp_path, {})
    weights = (tmp_path / "model.safetensors").read_bytes()

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DataError, match="model.safetensors: missing"):
        load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(DataError, match="model.safetensors: not a readable safetensors"):
        load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="config.json: unreadable JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('["vae"]')
    with pytest.raises(DataError, match="config.json: expected a JSON object"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model": "gan"}')
    with pytest.raises(DataError, match="config.json: 'model' is 'gan'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model": "vae", "latent_dim": "eight"}')
    with pytest.raises(DataError, match="config.json: 'latent_dim'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model": "vae", "latent_dim": 8}')
    assert isinstance(load_pretrained(tmp_path)[0], VAE)


def test_compiled_model_saves_plain_keys(tmp_path):
    # torch.compile wraps lazily: the wrapper's state dict already has "_orig_mod." keys, and no
    # compilation happens unless it is called, so this stays fast on CPU.
    model = VAE(8)
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_pretrained(compiled, tmp_path, {})
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys == set(model.state_dict()) and not any("_orig_mod" in k for k in keys)
    loaded, config = load_pretrained(tmp_path)
    assert config == {"model": "vae", "latent_dim": 8}
    assert torch.equal(loaded.dec_fc.weight, model.dec_fc.weight)
