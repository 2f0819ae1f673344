"""Command-line overrides of the dataclass configs: both flag spellings, bare booleans, presets, errors."""
import pytest

from vqgpt.config import (GPT_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GPTTrainConfig, QuantizeConfig, VQGANTrainConfig,
                          config_from_dict, config_to_dict, parse_config)


def test_both_flag_spellings_and_preset_overrides():
    cfg = parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--preset", "tiny", "--max-steps", "20",
                                                               "--lr=3e-4", "--ch-mult=1,2", "--attn-resolutions", "()"])
    assert cfg.max_steps == 20 and cfg.lr == 3e-4 and cfg.ch_mult == (1, 2) and cfg.attn_resolutions == ()
    # everything not overridden comes from the preset, not from the dataclass defaults
    assert cfg.codebook_size == VQGAN_TRAIN_PRESETS["tiny"].codebook_size
    assert cfg.disc_weight == VQGAN_TRAIN_PRESETS["tiny"].disc_weight != VQGANTrainConfig().disc_weight


@pytest.mark.parametrize("argv, expected", [([], False), (["--flip"], True), (["--flip", "false"], False),
                                            (["--flip=yes"], True), (["--flip", "--batch-size=4"], True)])
def test_boolean_flags_bare_or_with_a_value(argv, expected):
    assert parse_config(QuantizeConfig, {}, argv).flip is expected


@pytest.mark.parametrize("argv, message", [(["--max-stepz=3"], "valid settings"), (["--compile=maybe"], "true/false"),
                                           (["--preset=nope"], "invalid choice"), (["--max-steps=x"], "invalid")])
def test_bad_flags_exit_2_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_saved_config_round_trips():
    cfg = parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--preset=g256", "--n-layer=2"])
    assert config_from_dict(GPTTrainConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("argv, message", [(["--grad-accum=0"], "--grad-accum must be at least 1"),
                                           (["--lr=0"], "--lr must be positive"),
                                           (["--precision=fp8"], "--precision must be auto, fp32, bf16 or fp16"),
                                           (["--eval-batch-size=0"], "--eval-batch-size"),
                                           (["--sample-temperature=0"], "--sample-temperature must be positive"),
                                           (["--n-layer=0"], "n_layer must be positive")])
def test_settings_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--preset=tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
