"""bench/quality.py: it reuses a finished run only when it was trained as the bench would train it now, its
colour figures (bench/colour.py) on hand-made images, and one tiny run of the whole bench whose JSON figures
must agree with each other."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.colour import (chroma, chroma_error, chroma_std_ratio, encoder_features, grey_chroma_error, patch_chroma,
                          pool_to_grid, probe_encoder, ridge_probe_r2)
from bench.quality import main, parse_args, reusable, run_folder, vqgan_command
from models.vqgan import VQGAN, VQGAN_PRESETS
from vqgpt.config import config_to_dict, parse_config
from vqgpt.settings import VQGAN_TRAIN_PRESETS, VQGANTrainConfig

BUDGET = SimpleNamespace(steps=271, batch_size=8)


def fake_finished_run(run: Path, command: list[str], steps: int = 271, **changes) -> dict:
    """A run folder as the trainer leaves it after `steps` steps, its config as `command` gives it plus `changes`."""
    config = {**config_to_dict(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, command[2:])), **changes}
    run.mkdir(parents=True)
    save_config(run, config)
    (run / "latest").write_text(f"step_{steps:08d}.pt\n")
    return config


def save_config(run: Path, config: dict) -> None:
    (run / "config.json").write_text(json.dumps({"stage": "vqgan", "config": config}))


def command_for(run: Path, seed: int = 0, flags: tuple[str, ...] = ()) -> list[str]:
    return vqgan_command("b64", Path("data/real/clipart"), run, seed, BUDGET, list(flags), ["--perceptual-weight=0"])


def test_seed_zero_keeps_the_plain_run_name(tmp_path):
    assert run_folder(tmp_path, "photos", "ours", 0) == tmp_path / "photos-ours"
    assert run_folder(tmp_path, "photos", "ours", 1) == tmp_path / "photos-ours-seed1"


def test_a_run_trained_as_the_command_says_is_reused(tmp_path):
    run = tmp_path / "clipart-ours"
    fake_finished_run(run, command_for(tmp_path / "elsewhere"))   # only the paths differ
    assert reusable(run, command_for(run), BUDGET.steps)


def test_an_unfinished_run_is_trained_again(tmp_path):
    run = tmp_path / "clipart-ours"
    fake_finished_run(run, command_for(run), steps=100)
    assert not reusable(run, command_for(run), BUDGET.steps)


@pytest.mark.parametrize("flags, changes, named", [
    ((), {"l1_weight": 1.0}, "l1_weight"),                  # the preset changed since the run
    (("--lr", "3e-4"), {}, "lr"),                             # the bench is given another flag
])
def test_a_run_trained_otherwise_stops_the_bench(tmp_path, flags, changes, named):
    run = tmp_path / "clipart-ours"
    fake_finished_run(run, command_for(run), **changes)
    with pytest.raises(SystemExit, match=named):
        reusable(run, command_for(run, flags=flags), BUDGET.steps)


def test_another_seed_is_not_reused(tmp_path):
    run = tmp_path / "clipart-ours"
    fake_finished_run(run, command_for(run, seed=0))
    with pytest.raises(SystemExit, match="seed"):
        reusable(run, command_for(run, seed=1), BUDGET.steps)


def test_a_setting_newer_than_the_run_counts_as_its_default(tmp_path):
    run = tmp_path / "clipart-ours"
    config = fake_finished_run(run, command_for(run))
    del config["dropout"]        # 0.0 now: a run from before the option trained without it
    save_config(run, config)
    assert reusable(run, command_for(run), BUDGET.steps)
    with pytest.raises(SystemExit, match="dropout"):
        reusable(run, command_for(run, flags=("--dropout", "0.1")), BUDGET.steps)


def test_a_run_older_than_a_preset_default_stops_the_bench(tmp_path):
    run = tmp_path / "clipart-ours"
    config = fake_finished_run(run, command_for(run))
    assert config["pooled_input"]   # b64 takes it now; a run from before the option trained without
    del config["pooled_input"]
    save_config(run, config)
    with pytest.raises(SystemExit, match="pooled_input"):
        reusable(run, command_for(run), BUDGET.steps)


def test_a_finished_run_without_its_config_stops_the_bench_in_one_line(tmp_path):
    run = tmp_path / "clipart-ours"
    fake_finished_run(run, command_for(run))
    (run / "config.json").unlink()
    with pytest.raises(SystemExit, match="config.json"):
        reusable(run, command_for(run), BUDGET.steps)


def test_a_seed_named_twice_is_counted_once():
    assert parse_args(["--seeds", "0", "1", "0"]).seeds == [0, 1]


# ---- colour figures (bench/colour.py) ----

def random_images(count: int = 4, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def desaturated(images_uint8: np.ndarray, factor: float) -> np.ndarray:
    """Float (N, 3, H, W) in [-1, 1]: grey + factor x chroma."""
    x = images_uint8.transpose(0, 3, 1, 2) / 127.5 - 1.0
    grey = x.mean(1, keepdims=True)
    return grey + factor * (x - grey)


def test_a_grey_image_has_no_chroma():
    grey = np.repeat(random_images()[..., :1], 3, axis=-1)     # R = G = B everywhere
    assert np.abs(chroma(grey)).max() < 1e-12          # 0 up to rounding of the channel mean
    assert grey_chroma_error(grey) < 1e-24


def test_chroma_is_the_pixel_minus_the_mean_of_its_channels_in_unit_range():
    pixel = np.array([255, 0, 0], dtype=np.uint8).reshape(1, 1, 1, 3)      # (1, -1, -1) in [-1, 1]
    assert chroma(pixel).ravel() == pytest.approx([4 / 3, -2 / 3, -2 / 3])
    as_float = torch.tensor([1.0, -1.0, -1.0]).reshape(1, 3, 1, 1)         # the same pixel as the networks see it
    assert chroma(as_float).ravel() == pytest.approx([4 / 3, -2 / 3, -2 / 3])


def test_chroma_error_is_zero_for_identical_images_and_matches_a_hand_computation():
    images = random_images()
    assert chroma_error(images, images) == 0
    # one pixel (0.6, 0, 0) against a grey answer: chroma (0.4, -0.2, -0.2), error its mean square
    original = np.array([0.6, 0.0, 0.0]).reshape(1, 3, 1, 1)
    assert chroma_error(original, np.zeros_like(original)) == pytest.approx((0.4 ** 2 + 2 * 0.2 ** 2) / 3)
    # two pixels, the recon's colour off by (0.3, 0, 0) on one only; grey errors are not colour errors
    original = np.array([[0.6, 0.5], [0.0, 0.5], [0.0, 0.5]]).reshape(1, 3, 1, 2)
    recon = original + np.array([[0.3, 0.2], [0.0, 0.2], [0.0, 0.2]]).reshape(1, 3, 1, 2)
    assert chroma_error(original, recon) == pytest.approx((0.2 ** 2 + 2 * 0.1 ** 2) / 6)
    # the grey answer scores the originals' mean squared chroma
    images = random_images(seed=1)
    grey_answer = desaturated(images, 0.0)
    assert chroma_error(images, grey_answer) == pytest.approx(grey_chroma_error(images))


@pytest.mark.parametrize("factor", [0.0, 0.25, 0.8, 1.0, 1.5])
def test_the_chroma_ratio_of_a_desaturated_copy_is_the_factor(factor):
    images = random_images()
    assert chroma_std_ratio(images, desaturated(images, factor)) == pytest.approx(factor)
    assert chroma_std_ratio(images, images) == pytest.approx(1.0)


def test_patch_chroma_is_the_mean_chroma_of_each_token_patch():
    images = random_images(2, 8)
    patches = patch_chroma(images, (2, 2))
    assert patches.shape == (2, 3, 2, 2)
    assert patches[1, :, 0, 1] == pytest.approx(chroma(images)[1, :, :4, 4:].mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="grid"):
        pool_to_grid(chroma(images), (3, 3))


def probe_data(seed: int, count: int = 60, grid: int = 4):
    """Targets (N, 3, h, w) as patch chroma of random images, and features that hold them linearly, mixed."""
    rng = np.random.default_rng(seed)
    targets = patch_chroma(random_images(count, 2 * grid, seed), (grid, grid))
    mixing = np.random.default_rng(99).normal(size=(12, 3))   # the same 12 features on every set
    features = np.einsum("fk,nkhw->nfhw", mixing, targets) + np.random.default_rng(98).normal(size=(1, 12, 1, 1))
    return features + 1e-3 * rng.normal(size=features.shape), targets


def test_the_probe_finds_a_target_that_the_features_hold_linearly():
    fit_features, fit_targets = probe_data(0)
    score_features, score_targets = probe_data(1)
    assert ridge_probe_r2(fit_features, fit_targets, score_features, score_targets) > 0.99


def test_the_probe_finds_nothing_in_independent_noise():
    _, fit_targets = probe_data(0)
    _, score_targets = probe_data(1)
    rng = np.random.default_rng(5)
    noise_fit, noise_score = rng.normal(size=(60, 12, 4, 4)), rng.normal(size=(60, 12, 4, 4))
    r2 = ridge_probe_r2(noise_fit, fit_targets, noise_score, score_targets)
    assert -0.2 < r2 < 0.05       # on held-out images a fit to noise explains nothing, or less than a constant


def test_the_probe_of_grey_images_is_nan():
    features, targets = probe_data(0)
    assert math.isnan(ridge_probe_r2(features, targets, features, np.zeros_like(targets)))


def test_the_probe_gives_one_r2_per_encoder_level_of_the_tiny_vqgan():
    torch.manual_seed(0)
    vqgan = VQGAN(VQGAN_PRESETS["tiny"]).train()
    fit, score = random_images(24, 32, seed=0), random_images(12, 32, seed=1)
    features = encoder_features(vqgan, score, batch_size=5, keep_recon=True)
    assert vqgan.training                          # left as it was
    levels = len(VQGAN_PRESETS["tiny"].ch_mult)
    assert len(features.levels) == levels
    # level 0 is 16 px and the rest 8 px on tiny, each average-pooled to the 8 x 8 token grid
    assert [f.shape for f in features.levels] == [(12, 32, 8, 8), (12, 64, 8, 8), (12, 64, 8, 8)]
    assert features.recon.shape == (12, 3, 32, 32) and np.abs(features.recon).max() <= 1
    x = torch.from_numpy(score).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vqgan.eval()(x)[0].clamp(-1, 1)
        # level 0's output by hand: the first convolution, the level's blocks, its downsampling; pooled 16 -> 8
        h = vqgan.encoder.conv_in(x)
        for block in vqgan.encoder.levels[0].blocks:
            h = block(h)
        level0 = torch.nn.functional.avg_pool2d(vqgan.encoder.levels[0].downsample(h), 2)
    assert np.allclose(features.recon, recon.numpy(), atol=1e-5)   # the hooks change nothing the model computes
    assert np.allclose(features.levels[0], level0.numpy(), atol=1e-5)
    result = probe_encoder(vqgan, fit, score, batch_size=7)
    assert len(result["levels"]) == levels
    assert all(math.isfinite(r2) and r2 <= 1 for r2 in [*result["levels"], result["lookup"]])


# ---- the whole bench, tiny ----

@pytest.mark.slow
def test_a_tiny_bench_reports_figures_that_agree_with_each_other(shapes_shards, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "clipart").symlink_to(shapes_shards)
    out = tmp_path / "out"
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    code = main(["--data", str(data), "--out", str(out), "--sets", "clipart", "--ours", "tiny", "--reference", "none",
                 "--steps", "2", "--batch-size", "4", "--seeds", "0", "1", "--gpt-steps", "0",
                 "--colour-images", "40", "--probe-train", "60"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["steps"] == 2 and figures["seeds"] == [0, 1]
    assert figures["clipart_val_images"] == 100                     # the trainer's eval: the whole val split
    assert figures["clipart_colour_val_images"] == 40 and figures["clipart_probe_train_images"] == 60
    assert 0 < figures["clipart_ours_codebook_usage"] <= 1
    assert figures["clipart_ours_codes_used"] == pytest.approx(256 * figures["clipart_ours_codebook_usage"], abs=0.51)
    assert math.isfinite(figures["clipart_ours_psnr"]) and figures["clipart_ours_psnr"] > 0
    for key in ("psnr", "chroma_ratio", "chroma_error"):
        per_seed = figures[f"clipart_ours_{key}_per_seed"]
        assert len(per_seed) == 2 and figures[f"clipart_ours_{key}"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    ratios, errors = figures["clipart_ours_chroma_ratio_per_seed"], figures["clipart_ours_chroma_error_per_seed"]
    assert all(0 < r < math.inf for r in ratios) and all(e >= 0 for e in errors)
    original_std = figures["clipart_val_chroma_std"]
    assert figures["clipart_grey_chroma_error"] >= original_std ** 2 - 1e-4 > 0   # mean square >= variance
    for ratio, error in zip(ratios, errors):
        # |std(recon chroma) - std(original chroma)| <= std(their difference) <= its root mean square
        assert abs(ratio - 1) * original_std <= math.sqrt(error) + 1e-3
    levels = figures["clipart_ours_probe_r2_levels"]
    assert len(levels) == len(VQGAN_PRESETS["tiny"].ch_mult)
    assert all(r2 is not None and r2 <= 1 for r2 in [*levels, figures["clipart_ours_probe_r2_lookup"]])
    assert "clipart_ours_probe_r2_levels_per_seed" not in figures     # the probe runs on the first seed only


def test_the_colour_sample_sizes_are_checked():
    assert parse_args([]).colour_images == 200 and parse_args([]).probe_train == 500
    with pytest.raises(SystemExit):
        parse_args(["--colour-images", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--probe-train", "-1"])
