"""Command-line overrides of the dataclass configs: both flag spellings, bare booleans, presets, errors."""
import pytest

from vqgpt.config import config_from_dict, config_to_dict, parse_config

from vqgpt.settings import (GPT_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GPTTrainConfig, QuantizeConfig, SampleConfig,
                            ShardifyConfig, VQGANTrainConfig)
from vqgpt.errors import ConfigError


def test_both_flag_spellings_and_preset_overrides():
    cfg = parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--preset", "tiny", "--data=d", "--max-steps", "20",
                                                               "--lr=3e-4", "--ch-mult=1,2", "--attn-resolutions", "()"])
    assert cfg.max_steps == 20 and cfg.lr == 3e-4 and cfg.ch_mult == (1, 2) and cfg.attn_resolutions == ()
    # everything not overridden comes from the preset, not from the dataclass defaults
    assert cfg.codebook_size == VQGAN_TRAIN_PRESETS["tiny"].codebook_size
    assert cfg.disc_weight == VQGAN_TRAIN_PRESETS["tiny"].disc_weight != VQGANTrainConfig().disc_weight


@pytest.mark.parametrize("argv, expected", [([], False), (["--flip"], True), (["--flip", "false"], False),
                                            (["--flip=yes"], True), (["--flip", "--batch-size=4"], True)])
def test_boolean_flags_bare_or_with_a_value(argv, expected):
    assert parse_config(QuantizeConfig, {}, ["--vqgan=v", "--data=d", "--out=o", *argv]).flip is expected


@pytest.mark.parametrize("argv, message", [(["--max-stepz=3"], "valid settings"), (["--compile=maybe"], "true/false"),
                                           (["--preset=nope"], "invalid choice"), (["--max-steps=x"], "invalid")])
def test_bad_flags_exit_2_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--tokens=t", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(VQGAN_TRAIN_PRESETS))
def test_every_preset_turns_its_gan_on_before_its_run_ends(name):
    preset = VQGAN_TRAIN_PRESETS[name]
    assert preset.disc_weight > 0 and preset.disc_start < preset.max_steps


def test_a_run_that_ends_before_its_gan_starts_says_so(shapes_shards, tmp_path):
    from tests.helpers import run_script, vqgan_args

    result = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "run", 1, "--disc-start=5"))
    assert "trains without the GAN" in result.stdout + result.stderr


def test_saved_configs_with_a_removed_setting_load_only_where_it_was_off():
    saved = config_to_dict(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--preset=b64", "--data=d"]))
    off = {**saved, "rotation_trick": False, "ema_decay": 0.0, "fsq_levels": [], "chroma_gain": 1.0}
    assert config_from_dict(VQGANTrainConfig, off) == config_from_dict(VQGANTrainConfig, saved)
    for key, value in (("chroma_gain", 2.3), ("ema_decay", 0.99), ("rotation_trick", True), ("quantizer", "fsq")):
        with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} .*no longer has"):
            config_from_dict(VQGANTrainConfig, {**saved, key: value})


@pytest.mark.parametrize("argv, message", [
    (["--muon-lr-scale=2"], "--muon-lr-scale applies with --optimizer muon only; this run has adam"),
    (["--preset=tiny", "--permuted-share=0.5"], "--permuted-share applies with --permute-channels true only"),
    (["--global-batch-size=64", "--grad-accum=2"], "--grad-accum follows from --global-batch-size; give one")])
def test_a_flag_this_run_would_ignore_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # where it applies, or set by a preset the flags then narrow, it is taken
    assert parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", "--optimizer=muon",
                                                                "--muon-lr-scale=2"]).muon_lr_scale == 2
    assert not parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", "--preset=b64",
                                                                    "--permute-channels=false"]).permute_channels


@pytest.mark.parametrize("argv", [["--lr=1e-3", "--lr", "3e-4"], ["--flip", "--flip=false"]])
def test_a_setting_given_twice_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", *argv])
    assert exit_info.value.code == 2 and "is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # an alias counts as the same setting
        parse_config(SampleConfig, {}, ["--gpt=g", "--out=o", "--n=4", "--num-samples=8"])
    assert "--num-samples is given twice (also as --n)" in capsys.readouterr().err


def test_saved_config_round_trips():
    cfg = parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--preset=g256", "--tokens=t", "--n-layer=2"])
    assert config_from_dict(GPTTrainConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("argv, message", [(["--grad-accum=0"], "--grad-accum must be at least 1"),
                                           (["--lr=0"], "--lr must be positive"),
                                           (["--precision=fp8"], "invalid choice: 'fp8'"),
                                           (["--eval-batch-size=0"], "--eval-batch-size"),
                                           (["--sample-temperature=0"], "--sample-temperature must be positive"),
                                           (["--n-layer=0"], "n_layer must be positive")])
def test_settings_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--preset=tiny", "--tokens=t", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cls, presets, argv, missing", [
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--preset=tiny"], "--data"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--preset=tiny"], "--tokens"),
    (QuantizeConfig, {}, ["--vqgan=v", "--data=d"], "--out"),
    (SampleConfig, {}, ["--out=o"], "--gpt"),
    (ShardifyConfig, {}, ["--size=16"], "PATH")])
def test_required_settings_are_enforced_by_the_parser(cls, presets, argv, missing, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, presets, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the following arguments are required" in err and missing in err, err


@pytest.mark.parametrize("cls, presets, argv", [
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--tokens=t", "--n-classes=3"]),        # taken from the token manifest
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--tokens=t", "--tokens-per-image=64"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", "--weight-decay=0.01"])])   # the VQGAN trains without
def test_settings_a_stage_sets_itself_are_not_offered(cls, presets, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, presets, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: " + argv[-1] in err, err
    with pytest.raises(SystemExit):
        parse_config(cls, presets, ["--help"])
    assert argv[-1].split("=")[0] not in capsys.readouterr().out


def test_help_shows_no_empty_preset_list(capsys):
    with pytest.raises(SystemExit):
        parse_config(QuantizeConfig, {}, ["--help"])
    assert "--preset" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, ["--help"])
    assert "--preset {g256,llamagen-B,llamagen-L,llamagen-XL,llamagen-XXL,seed,tiny}" in capsys.readouterr().out


def test_shardify_and_sample_parse_into_their_configs():
    cfg = parse_config(ShardifyConfig, {}, ["--builtin=shapes", "out", "--val-count=5"])
    assert (cfg.dest, cfg.source, cfg.image_size, cfg.val_fraction, cfg.val_count) == ("out", "", 32, None, 5)
    cfg = parse_config(ShardifyConfig, {}, ["src", "dest", "--size=64"])
    assert (cfg.source, cfg.dest, cfg.image_size) == ("src", "dest", 64)
    cfg = parse_config(SampleConfig, {}, ["--gpt=g", "--out=o", "--n=3", "--class=2", "--cfg=2", "--kv-cache=false"])
    assert (cfg.num_samples, cfg.class_, cfg.cfg, cfg.kv_cache) == (3, 2, 2.0, False)
