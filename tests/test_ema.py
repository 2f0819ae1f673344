"""Weight EMA (--ema-decay): the average itself, its saved setting told apart from the removed EMA codebook."""
from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPT_PRESETS
from vqgpt.config import check_removed_settings, config_from_dict, config_to_dict, parse_config
from vqgpt.ema import WeightEMA
from vqgpt.errors import ConfigError
from vqgpt.settings import GPT_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GPTTrainConfig


def test_the_average_moves_by_one_minus_decay_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, 0.75)
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update()
    for averaged, old, new in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(averaged, 0.75 * old + 0.25 * new)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_decay_zero_is_the_trained_weights():
    torch.manual_seed(0)
    model = GPT(GPT_PRESETS["tiny"])
    ema = WeightEMA(model, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.37).add_(0.01)
    ema.update()
    for key, value in model.state_dict().items():
        assert torch.equal(ema.model.state_dict()[key], value), key
    assert WeightEMA.start(model, 0.0, None, "gpt_ema") is None   # --ema-decay 0: no copy kept at all


def test_the_flag_is_ema_decay_saved_as_weight_ema_decay_and_the_old_codebook_ema_stays_refused():
    cfg = parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--tokens=t", "--preset=tiny", "--ema-decay=0.999"])
    saved = config_to_dict(cfg)
    assert saved["weight_ema_decay"] == 0.999 and "ema_decay" not in saved
    assert config_from_dict(GPTTrainConfig, saved).weight_ema_decay == 0.999
    check_removed_settings(saved, "run")   # the weight EMA is no removed setting
    # a VQGAN made with the EMA codebook, before its removal
    with pytest.raises(ConfigError, match="--ema-decay 0.99 \\(the quantizer's EMA codebook\\)"):
        check_removed_settings({**config_to_dict(VQGAN_TRAIN_PRESETS["tiny"]), "ema_decay": 0.99}, "old run")
    with pytest.raises(ValueError, match="--ema-decay must be in"):
        GPTTrainConfig(tokens="t", weight_ema_decay=1.0)


def test_only_the_long_presets_keep_an_ema():
    """The rule the presets follow: an EMA (0.9999, a horizon of 10k steps) on runs longer than 100k steps, except
    taming's configurations, which reproduce taming (no EMA); short runs would average in their first steps."""
    presets = {**{f"vqgan {n}": p for n, p in VQGAN_TRAIN_PRESETS.items()},
               **{f"gpt {n}": p for n, p in GPT_TRAIN_PRESETS.items()}}
    for name, preset in presets.items():
        expected = 0.9999 if preset.max_steps > 100_000 and "taming" not in name else 0
        assert preset.weight_ema_decay == expected, name
