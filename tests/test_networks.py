"""Networks: shapes and gradients, the quantizer against hand computations, LPIPS loading."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision

from models.discriminator import NLayerDiscriminator
from models.perceptual import VGG16_WEIGHTS_FILE, LPIPSWeightsMissing, build_lpips, find_vgg_weights
from models.quantizer import VectorQuantizer
from models.vqgan import VQGAN, VQGAN_PRESETS, VQGANConfig, count_parameters

SMALL_B64 = dataclasses.replace(VQGAN_PRESETS["b64"], ch=32, codebook_size=64, codebook_dim=16)


@pytest.mark.parametrize("config", [VQGAN_PRESETS["tiny"], SMALL_B64], ids=["tiny", "b64-shaped"])
def test_vqgan_shapes_and_gradients_reach_every_parameter(config):
    torch.manual_seed(0)
    model = VQGAN(config)
    images = torch.rand(2, 3, config.image_size, config.image_size) * 2 - 1
    recon, quant_loss, indices, stats = model(images)
    h, w = model.latent_grid
    assert recon.shape == images.shape and indices.shape == (2, h, w)
    assert h == config.image_size // 2 ** (len(config.ch_mult) - 1)
    assert indices.max() < config.codebook_size and stats["perplexity"] >= 1
    ((recon - images).abs().mean() + quant_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_indices_round_trip_equals_the_forward_reconstruction():
    torch.manual_seed(0)
    model = VQGAN(VQGAN_PRESETS["tiny"]).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, _, indices, _ = model(images)
        tokens = model.encode_to_indices(images)
        assert torch.equal(tokens, indices.flatten(1))
        assert torch.equal(model.decode_indices(tokens), recon)


def quantizer(**overrides) -> VectorQuantizer:
    settings = dict(z_channels=2, codebook_dim=2, codebook_size=3, beta=0.25)
    config = dataclasses.replace(VQGANConfig(), **{**settings, **overrides})
    return VectorQuantizer(config)


def test_quantizer_losses_and_gradients_by_hand():
    vq = quantizer()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    z = torch.tensor([[0.2, 0.1], [0.9, 1.3]]).t().reshape(1, 2, 1, 2).clone().requires_grad_(True)
    z_q, loss, indices, stats = vq(z)
    assert indices.flatten().tolist() == [0, 1]
    assert stats["perplexity"].item() == pytest.approx(2.0)   # two of three codes, used equally
    chosen = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    flat = torch.tensor([[0.2, 0.1], [0.9, 1.3]])
    mse = ((flat - chosen) ** 2).mean()
    assert loss.item() == pytest.approx((1 + 0.25) * mse.item())
    torch.testing.assert_close(z_q.detach(), chosen.t().reshape(1, 2, 1, 2))
    downstream = torch.tensor([[1.0, -2.0], [0.5, 3.0]]).t().reshape(1, 2, 1, 2)
    (loss + (z_q * downstream).sum()).backward()
    # encoder: straight-through downstream gradient + beta * commitment gradient
    commitment_grad = 0.25 * 2 * (flat - chosen) / flat.numel()
    torch.testing.assert_close(z.grad, downstream + commitment_grad.t().reshape(1, 2, 1, 2))
    # codebook: only the (unweighted) codebook term, on the codes that were used
    expected = torch.zeros(3, 2)
    expected[:2] = 2 * (chosen - flat) / flat.numel()
    torch.testing.assert_close(vq.codebook.grad, expected)


def test_pooled_input_adds_the_image_pooled_to_each_level_below_the_first():
    torch.manual_seed(0)
    config = dataclasses.replace(VQGAN_PRESETS["tiny"], pooled_input=True)
    plain, pooled = VQGAN(VQGAN_PRESETS["tiny"]).eval(), VQGAN(config).eval()
    result = pooled.load_state_dict(plain.state_dict(), strict=False)
    levels = len(config.ch_mult)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == sorted(
        f"encoder.pooled_in.{i}.{name}" for i in range(levels) for name in ("weight", "bias"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = []
    for conv in pooled.encoder.pooled_in:
        conv.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output.shape)))
    with torch.no_grad():
        pooled(images)
    # tiny (32 px, ch 32, mult 1,2,2): levels 0 and 1 halve the grid, the last does not; each level's output
    # (the next level's input, or the middle's) gets the image pooled to that grid
    factors = [2, 4, 4]
    assert [tuple(shape) for _, shape in seen] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 8, 8)]
    for (read, _), factor in zip(seen, factors):
        torch.testing.assert_close(read, F.avg_pool2d(images, factor))
    with torch.no_grad():   # with the pooled paths at zero the network is the plain one
        for p in pooled.encoder.pooled_in.parameters():
            p.zero_()
        torch.testing.assert_close(pooled(images)[0], plain(images)[0])


def test_argmin_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = quantizer(codebook_size=512, z_channels=8, codebook_dim=8)
    with torch.no_grad():   # codes packed closer than bf16's resolution
        vq.codebook.copy_(torch.randn(1, 8) + 1e-2 * torch.randn(512, 8))
    flat = vq.codebook.detach()[:64] + 1e-4
    z = flat.t().reshape(1, 8, 8, 8)
    _, _, reference, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, under_autocast, _ = vq(z)
        codes = vq.codebook.to(torch.bfloat16)
        naive = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)).argmin(1)
    assert torch.equal(reference.flatten(), torch.arange(64))
    assert torch.equal(under_autocast, reference)
    assert not torch.equal(naive, reference.flatten())   # the same lookup in bf16 would pick wrong codes


def test_l2_quantizer_looks_up_in_a_low_dimensional_normalised_space():
    config = VQGAN_PRESETS["tiny"]
    vq = VectorQuantizer(config)
    assert vq.project_in.out_channels == config.codebook_dim == 8
    z = torch.randn(4, config.z_channels, 8, 8)
    z_q, _, indices, _ = vq(z)
    lookup = F.normalize(vq.project_in(z).permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    cosine = lookup @ F.normalize(vq.codebook, dim=1).t()
    assert torch.equal(indices.flatten(), cosine.argmax(1))   # nearest in l2 == highest cosine
    torch.testing.assert_close(z_q, vq.indices_to_embedding(indices))


def test_dead_codes_are_restarted_from_encoder_outputs_after_the_step():
    torch.manual_seed(0)
    vq = quantizer(dead_code_steps=2, codebook_size=4)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 0.0], [0.0, 300.0]]))
    z = torch.tensor([[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]]).t().reshape(1, 2, 1, 3)
    before = vq.codebook.detach().clone()
    vq(z)
    assert torch.equal(vq.codebook, before)   # the forward never writes the codebook
    assert len(vq.restart_dead_codes()) == 0
    vq(z)
    assert vq.restart_dead_codes().tolist() == [1, 2, 3]   # codes 1-3 unused for 2 steps
    encoder_rows = {tuple(round(v, 4) for v in row) for row in z.reshape(2, 3).t().tolist()}
    for code in vq.codebook[1:].tolist():
        assert tuple(round(v, 4) for v in code) in encoder_rows
    vq.eval()
    vq(z)
    assert len(vq.restart_dead_codes()) == 0   # evaluation forwards count nothing


def test_usage_adds_up_over_micro_steps_and_a_skipped_step_ages_no_code():
    vq = quantizer(dead_code_steps=1, codebook_size=3)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]]))
    near = [torch.tensor([[0.1, 0.1]]).t().reshape(1, 2, 1, 1), torch.tensor([[4.9, 5.0]]).t().reshape(1, 2, 1, 1)]
    for z in near:   # two micro-steps use codes 0 and 1
        vq(z)
    assert vq.restart_dead_codes().tolist() == [2]
    vq(near[0])
    vq.discard_step_usage()   # the trainer skipped that step
    assert vq.steps_unused.tolist() == [0, 0, 0] and len(vq.restart_dead_codes()) == 0


def test_a_non_finite_batch_restarts_no_code():
    vq = quantizer(dead_code_steps=1, codebook_size=4)
    before = vq.codebook.detach().clone()
    vq(torch.full((1, 2, 1, 3), float("nan")))
    assert len(vq.restart_dead_codes()) == 0 and torch.equal(vq.codebook, before)


def test_restarted_rows_start_with_fresh_adam_moments():
    from vqgpt.optim import reset_moments

    vq = quantizer(dead_code_steps=1, codebook_size=4)
    optimizer = torch.optim.Adam([vq.codebook], lr=0.1)
    vq.codebook.grad = torch.ones_like(vq.codebook)
    optimizer.step()
    reset_moments(optimizer, vq.codebook, torch.tensor([1, 3]))
    state = optimizer.state[vq.codebook]
    for moment in (state["exp_avg"], state["exp_avg_sq"]):
        assert (moment[[1, 3]] == 0).all() and (moment[[0, 2]] > 0).all()


def test_taming_loss_form_puts_beta_on_the_codebook_term():
    vq = quantizer(vq_loss="taming")
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    flat = torch.tensor([[0.2, 0.1], [0.9, 1.3]])
    z = flat.t().reshape(1, 2, 1, 2).clone().requires_grad_(True)
    z_q, loss, _, _ = vq(z)
    chosen = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert loss.item() == pytest.approx((1 + 0.25) * ((flat - chosen) ** 2).mean().item())   # same value...
    loss.backward()
    # ...but the encoder is pulled with weight 1 and the codebook with beta (taming's legacy=True)
    torch.testing.assert_close(z.grad, (2 * (flat - chosen) / flat.numel()).t().reshape(1, 2, 1, 2))
    expected = torch.zeros(3, 2)
    expected[:2] = 0.25 * 2 * (chosen - flat) / flat.numel()
    torch.testing.assert_close(vq.codebook.grad, expected)


@pytest.mark.parametrize("name", sorted(VQGAN_PRESETS))
def test_every_preset_quantizer_runs(name):
    config = VQGAN_PRESETS[name]
    vq = VectorQuantizer(config)
    assert vq.codebook_size == config.codebook_size
    z = torch.randn(2, config.z_channels, 4, 4, requires_grad=True)
    z_q, loss, indices, _ = vq(z)
    (z_q.square().mean() + loss).backward()
    assert z_q.shape == z.shape and torch.isfinite(z.grad).all() and indices.max() < config.codebook_size
    torch.testing.assert_close(vq.indices_to_embedding(indices), z_q.detach())


def test_codebook_lookup_opts_out_of_tf32(monkeypatch):
    import models.quantizer as quantizer_module

    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True   # what the trainers set on CUDA (the legacy flag: see configure_backends)
    try:
        with quantizer_module.full_fp32_matmul():
            assert matmul.allow_tf32 is False
        assert matmul.allow_tf32 is True
        inside = []
        real_context = quantizer_module.full_fp32_matmul

        @contextlib.contextmanager
        def recording():
            with real_context():
                yield inside.append(matmul.allow_tf32)
        monkeypatch.setattr(quantizer_module, "full_fp32_matmul", recording)
        quantizer().nearest_codes(torch.randn(4, 2))
        assert inside == [False]
    finally:
        matmul.allow_tf32 = previous


def test_patchgan_gives_patch_logits_and_normalises_real_and_fake_apart():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 16, 3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) * 3 + 1
    logits_real, logits_fake = disc(real, fake)
    assert torch.allclose(logits_real, disc(real)) and torch.allclose(logits_fake, disc(fake))
    mixed_real, _ = disc(torch.cat([real, fake])).chunk(2)   # one BatchNorm batch would mix their statistics
    assert not torch.allclose(mixed_real, logits_real, atol=1e-3)


def test_preset_sizes():
    counts = {name: count_parameters(VQGAN(config)) / 1e6 for name, config in VQGAN_PRESETS.items()}
    print("VQGAN parameters (M):", counts)
    assert counts["tiny"] < 2 and 15 < counts["b64"] < 20 and 60 < counts["seed"] < 90
    assert VQGAN_PRESETS["b64"].codebook_size == 1024 and VQGAN_PRESETS["seed"].codebook_size == 8192
    # the two taming f16 presets differ by their codebooks alone (15,360 more 256-d codes), and ours by their
    # 8-d lookups (8192 more codes); the networks around them are the same
    sizes = {name: count_parameters(VQGAN(config)) for name, config in VQGAN_PRESETS.items()}
    assert sizes["taming-f16-16384"] - sizes["taming-f16-1024"] == (16384 - 1024) * 256
    assert sizes["f16-16384"] - sizes["seed"] == (16384 - 8192) * 8
    with pytest.raises(ValueError, match="multiple of 8"):
        dataclasses.replace(VQGAN_PRESETS["b64"], image_size=60)


def test_lpips_heads_load_strictly_and_measure_something():
    model = build_lpips(random_backbone=True)
    assert model.backbone == "random"
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                         map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(model.network.lins[k].model[1].weight, shipped[f"lin{k}.model.1.weight"])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model(x, x), torch.zeros(2)) and (model(x, y) > 0).all()


def test_lpips_backbone_from_the_hub_cache_or_a_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_vgg_weights(None) is None
    with pytest.raises(LPIPSWeightsMissing) as missing:
        build_lpips(None)
    assert VGG16_WEIGHTS_FILE in str(missing.value) and str(tmp_path / "hub" / "checkpoints") in str(missing.value)
    with pytest.raises(LPIPSWeightsMissing, match="no such file"):
        build_lpips(str(tmp_path / "nope.pth"))
    torch.manual_seed(3)
    vgg_state = torchvision.models.vgg16(weights=None).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(vgg_state, tmp_path / "hub" / "checkpoints" / VGG16_WEIGHTS_FILE)
    model = build_lpips(None)
    assert model.backbone == "pretrained"
    assert torch.equal(model.network.net.slice1[0].weight, vgg_state["features.0.weight"])
    assert torch.equal(model.network.net.slice5._modules["28"].bias, vgg_state["features.28.bias"])
    broken = {k: v for k, v in vgg_state.items() if k != "features.10.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(LPIPSWeightsMissing, match="features.10.weight"):
        build_lpips(str(tmp_path / "broken.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(LPIPSWeightsMissing, match="cannot be read"):
        build_lpips(str(tmp_path / "text.pth"))
    wrong_shape = {**vgg_state, "features.0.weight": torch.zeros(1, 1, 1, 1)}
    torch.save(wrong_shape, tmp_path / "wrong.pth")
    with pytest.raises(LPIPSWeightsMissing, match="do not fit"):
        build_lpips(str(tmp_path / "wrong.pth"))
