"""Values that make no sense (issue 33): refused in one line when parsed, or handled without a traceback or NaN."""
from __future__ import annotations

import pytest

from vqgpt.config import ConfigError, config_from_dict, config_to_dict, parse_config
from vqgpt.settings import (EVALUATE_PRESETS, GPT_TRAIN_PRESETS, IMPORT_PRESETS, SAMPLE_PRESETS,
                            VQGAN_TRAIN_PRESETS, EvaluateConfig, GPTTrainConfig, ImportConfig, SampleConfig,
                            ShardifyConfig, VQGANTrainConfig)

VQGAN_BASE = ["--preset=tiny", "--data=d"]
GPT_BASE = ["--preset=tiny", "--tokens=t"]


def refused(cls, presets, argv, capsys) -> str:
    """The one error line parse_config prints (exit 2) for argv."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, presets, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# a network that cannot be built from these (a traceback at construction or at the first forward) or that would
# be built wrong (dropout 1 zeroes every activation; -1 discriminator layers built a 0-layer one)
@pytest.mark.parametrize("argv, message", [
    (["--dropout=1.5"], "dropout must be in [0, 1)"),
    (["--dropout=-0.1"], "dropout must be in [0, 1)"),
    (["--dropout=1"], "dropout must be in [0, 1)"),
    (["--disc-layers=6"], "disc_layers 6: a 32 px image fits a PatchGAN of 0 to 3 layers"),
    (["--disc-layers=-1"], "disc_layers -1"),
    (["--disc-ndf=0"], "disc_ndf must be positive"),
    (["--ch-mult="], "ch_mult must be one or more positive multipliers"),
    (["--ch-mult=1,0,2"], "ch_mult must be one or more positive multipliers"),
    (["--ch-mult=1,-2"], "ch_mult must be one or more positive multipliers"),
    (["--ch=48"], "every width must be at most 32 or a multiple of 32"),
    (["--image-size=0", "--attn-resolutions="], "image_size 0 must be a positive multiple of 4"),
    (["--image-size=-32", "--attn-resolutions="], "image_size -32 must be a positive multiple of 4"),
])
def test_vqgan_networks_that_cannot_be_built_are_refused_when_parsed(argv, message, capsys):
    assert message in refused(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, *argv], capsys)


def test_every_vqgan_preset_still_builds():
    import torch

    from models.discriminator import NLayerDiscriminator
    from models.vqgan import VQGAN_PRESETS

    for config in VQGAN_PRESETS.values():   # the checks refuse nothing a preset uses
        side = config.image_size
        NLayerDiscriminator(3, 8, config.disc_layers).eval()(torch.zeros(1, 3, side, side))


@pytest.mark.parametrize("cls, presets, argv, message", [
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lr=1e300"], "beyond the float32 range"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lr=-1e39"], "beyond the float32 range"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--disc-weight-max=1e300"], "beyond the float32 range"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--adam-betas=0.5,1e300"], "beyond the float32 range"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lr=1e400"], "not a finite number"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, f"--seed={2**63}"], "beyond the 64-bit integer range"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, f"--seed={2**64}"], "beyond the 64-bit integer range"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--seed=-1"], "--seed must not be negative"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, f"--batch-size={10**30}"], "beyond the 64-bit integer range"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, f"--attn-resolutions=8,{2**70}"], "64-bit"),
    (SampleConfig, SAMPLE_PRESETS, ["--gpt=g", "--out=o", f"--seed={2**63}"], "beyond the 64-bit integer range"),
    (SampleConfig, SAMPLE_PRESETS, ["--gpt=g", "--out=o", "--cfg=1e300", "--class=0"], "beyond the float32 range"),
    (SampleConfig, SAMPLE_PRESETS, ["--gpt=g", "--out=o", "--temperature=1e39"], "beyond the float32 range"),
    (EvaluateConfig, EVALUATE_PRESETS, ["--images=i", "--ref=r", f"--seed={2**63}"], "64-bit"),
    (EvaluateConfig, EVALUATE_PRESETS, ["--gpt=g", "--ref=r", "--cfg=1e300"], "beyond the float32 range"),
    (ImportConfig, IMPORT_PRESETS, ["--from=llamagen", "--ckpt=c", "--out=o", f"--image-size={2**64}"], "64-bit"),
    (ShardifyConfig, {}, ["s", "d", f"--seed={2**63}"], "beyond the 64-bit integer range"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, f"--max-steps={10**8}"], "eight digits of step_XXXXXXXX.pt"),
])
def test_numbers_that_overflow_are_refused_by_the_parser(cls, presets, argv, message, capsys):
    line = refused(cls, presets, argv, capsys)
    assert "error:" in line and message in line, line


@pytest.mark.parametrize("key, value", [("lr", 1e300), ("seed", 2**63), ("adam_betas", [0.5, float("inf")])])
def test_saved_configs_with_numbers_that_overflow_are_refused(key, value):
    saved = config_to_dict(VQGAN_TRAIN_PRESETS["tiny"]) | {"data": "d", key: value}
    with pytest.raises(ConfigError, match=f"saved config: {key} holds"):
        config_from_dict(VQGANTrainConfig, saved)


def _huge_torch():
    import torch
    return torch.zeros(10**12, 64)   # 256 TB: the CPU allocator refuses it at once


def _overflowing_torch():
    import torch
    return torch.zeros(10**18, 64)


def _huge_numpy():
    import numpy as np
    return np.empty((10**12, 64))   # MemoryError


def _overflowing_numpy():
    import numpy as np
    return np.empty((10**18, 64))   # ValueError: array is too big


@pytest.mark.parametrize("allocate", [_huge_torch, _overflowing_torch, _huge_numpy, _overflowing_numpy])
def test_an_allocation_that_cannot_succeed_is_one_line_and_exit_2(allocate, capsys):
    from vqgpt.errors import exit_on_user_error

    assert exit_on_user_error(allocate, "prog") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prog: error: not enough memory for what was asked"), err


def test_memory_that_runs_out_on_another_rank_is_said_by_that_rank(monkeypatch, capsys):
    """Memory runs out per rank: rank 3 alone may fail, and it must say so (a user error is rank 0's to print)."""
    from vqgpt.errors import UserError, exit_on_user_error

    def out_of_memory():
        raise MemoryError()

    def user_error():
        raise UserError("a bad flag")
    monkeypatch.setenv("RANK", "3")
    assert exit_on_user_error(out_of_memory, "prog") == 2
    assert capsys.readouterr().err.startswith("prog: error: rank 3: not enough memory")
    assert exit_on_user_error(user_error, "prog") == 2
    assert capsys.readouterr().err == ""


def test_other_errors_still_raise():
    from vqgpt.errors import exit_on_user_error

    def broken():
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        exit_on_user_error(broken, "prog")


def test_shardify_with_a_size_no_machine_holds_stops_in_one_line(tmp_path, capsys):
    import shardify
    from vqgpt.errors import exit_on_user_error

    cfg = parse_config(ShardifyConfig, {}, ["--builtin=shapes", str(tmp_path / "out"), f"--size={10**9}",
                                            "--builtin-count=2", "--workers=1", "--progress=false"])
    assert exit_on_user_error(lambda: shardify.main(cfg), "shardify") == 2
    assert capsys.readouterr().err.strip().startswith("shardify: error: not enough memory")
    assert not (tmp_path / "out").exists()   # nothing finished: the DEST it made goes too


@pytest.fixture(scope="module")
def tiny_gpt():
    import torch

    from models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(codebook_size=16, n_classes=2, tokens_per_image=6, n_layer=1, n_head=2, n_embd=32)).eval()


# each drew from NaN probabilities (torch.multinomial raised): 1/temperature overflowed fp32, a top_p below fp32's
# smallest number dropped every id, cfg_scale times a logit difference overflowed fp32
@pytest.mark.parametrize("options, same_as", [
    (dict(temperature=1e-45), dict(temperature=0)),
    (dict(temperature=1e-300), dict(temperature=0)),
    (dict(top_p=1e-300), dict(temperature=0)),
    (dict(top_p=1e-46, top_k=3), dict(temperature=0)),
    (dict(cfg_scale=1e300), dict(cfg_scale=1e300, temperature=0)),
    (dict(cfg_scale=3e38, temperature=1e-45, top_p=1e-300), dict(cfg_scale=3e38, temperature=0)),
])
def test_extreme_sampling_values_draw_the_limit_they_tend_to(tiny_gpt, options, same_as):
    import torch

    from vqgpt.sampling import sample_tokens

    labels = torch.tensor([0, 1, 0, 1])
    drawn = sample_tokens(tiny_gpt, 4, labels=labels, generator=torch.Generator().manual_seed(0), **options)
    assert torch.equal(drawn, sample_tokens(tiny_gpt, 4, labels=labels, **same_as))   # greedy is their limit


def test_filtered_logits_never_hold_nan_or_positive_inf():
    import torch

    from vqgpt.sampling import filter_logits

    logits = torch.tensor([[3e38, -3e38, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    for temperature in (1e-300, 1e-45, 1.0, 3e38):
        filtered = filter_logits(logits, temperature, top_k=3, top_p=1e-300, num_valid=3)
        assert not filtered.isnan().any() and (filtered <= 0).all() and filtered.isfinite().any(dim=-1).all()
        assert (filtered.softmax(-1).sum(-1) - 1).abs().max() < 1e-6


FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"


def _set(container: str, key, value):
    def mutate(checkpoint: dict):
        checkpoint[container][key] = value() if callable(value) else value
    return mutate


def _zeros(*shape):
    return lambda: __import__("torch").zeros(*shape)


# each was a traceback (AttributeError, ValueError, IndexError, ZeroDivisionError) where the importer read a shape
@pytest.mark.parametrize("source, mutate, message", [
    ("llamagen", _set("model", "quantize.embedding.weight", _zeros(64)), "needs 2 non-zero sizes"),
    ("llamagen", _set("model", "quantize.embedding.weight", _zeros(64, 8, 1)), "needs 2 non-zero sizes"),
    ("llamagen", _set("model", "quantize.embedding.weight", "x"), "'quantize.embedding.weight' holds str, not a tensor"),
    ("llamagen", _set("model", "quant_conv.weight", _zeros(8)), "needs 4 non-zero sizes"),
    ("llamagen", _set("model", "encoder.conv_in.weight", _zeros(0, 3, 3, 3)), "needs 4 non-zero sizes"),
    ("llamagen", _set("model", "encoder.conv_blocks.x.res.0.conv1.weight", _zeros(1)), "unexpected key"),
    ("llamagen", _set("model", 5, _zeros(1)), "holds the key 5, not a name"),
    ("llamagen", _set("discriminator", "main.0.weight", "x"), "[discriminator] 'main.0.weight' holds str"),
    ("llamagen", _set("discriminator", "main.0.weight", _zeros(())), "needs 4 non-zero sizes"),
    ("llamagen", _set("discriminator", "main.2.weight", "x"), "'main.2.weight' holds str"),
    ("taming", _set("state_dict", "loss.discriminator.main.0.weight", "x"), "holds str, not a tensor"),
    ("taming", _set("state_dict", "loss.discriminator.main.2.weight", [1]), "holds list, not a tensor"),
    ("taming", _set("state_dict", "loss.perceptual_loss.net.slice1.0", _zeros(1)), "does not fit torchvision's VGG16"),
    ("taming", _set("state_dict", "loss.perceptual_loss.net.slice1.0.weight", "x"), "holds str, not a tensor"),
    ("taming", _set("state_dict", 3, _zeros(1)), "holds the key 3, not a name"),
])
def test_malformed_checkpoints_are_refused_in_one_line(source, mutate, message, tmp_path, capsys):
    import torch

    import import_vqgan
    from vqgpt.errors import exit_on_user_error
    from vqgpt.safe_pickle import load_foreign_checkpoint

    if source == "llamagen":
        checkpoint = load_foreign_checkpoint(FIXTURES / "llamagen_vq.pt")
        checkpoint.pop("args")   # an argparse.Namespace stand-in: not for saving again
        argv = ["--from=llamagen", "--image-size=16"]
    else:
        checkpoint = {"state_dict": load_foreign_checkpoint(FIXTURES / "taming_last.ckpt")["state_dict"]}
        argv = ["--from=taming", f"--config={FIXTURES / 'taming_model.yaml'}"]
    mutate(checkpoint)
    torch.save(checkpoint, tmp_path / "source.pt")
    cfg = parse_config(ImportConfig, IMPORT_PRESETS, [*argv, f"--ckpt={tmp_path / 'source.pt'}", f"--out={tmp_path / 'run'}"])
    assert exit_on_user_error(lambda: import_vqgan.main(cfg), "import_vqgan") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--from=llamagen", "--image-size=-256"], "--image-size must be positive"),   # was imported as a -256 px VQGAN
    (["--from=llamagen", "--image-size=0"], "--image-size must be positive"),
    (["--from=taming", "--config=c.yaml", "--image-size=64"], "--image-size applies with --from llamagen only"),
    (["--from=taming", "--config=c.yaml", "--l2-norm=false"], "--l2-norm applies with --from llamagen only"),
    (["--from=llamagen", "--config=c.yaml"], "--config applies with --from taming only"),
])
def test_import_settings_that_make_no_sense_or_go_unused_are_refused(argv, message, capsys):
    assert message in refused(ImportConfig, IMPORT_PRESETS, [*argv, "--ckpt=c", "--out=o"], capsys)


# taming's model.yaml is read as a saved config is (types, ranges), then checked as a network: each was a
# traceback, and dropout 1 an import that zeroes every activation
@pytest.mark.parametrize("key, value, message", [
    ("ch", 10**30, "beyond the 64-bit integer range"),
    ("ch", True, "ch holds bool"),
    ("ch_mult", [1, "a"], "ch_mult holds tuple"),
    ("dropout", float("inf"), "not a finite number"),
    ("dropout", 1.0, "dropout must be in [0, 1)"),
    ("ch", 48, "GroupNorm"),
    ("resolution", -16, "image_size -16 must be a positive multiple"),
])
def test_taming_yaml_values_that_make_no_network_are_refused(key, value, message, tmp_path, capsys):
    import yaml

    import import_vqgan
    from vqgpt.errors import exit_on_user_error

    data = yaml.safe_load((FIXTURES / "taming_model.yaml").read_text())
    data["model"]["params"]["ddconfig"][key] = value
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(data))
    cfg = ImportConfig(from_="taming", ckpt=str(FIXTURES / "taming_last.ckpt"), config=str(tmp_path / "model.yaml"),
                       out=str(tmp_path / "run"))
    assert exit_on_user_error(lambda: import_vqgan.main(cfg), "import_vqgan") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.yaml" in err and message in err, err


# settings the run would record in config.json and silently not use (a missing file there went unnoticed)
@pytest.mark.parametrize("cls, presets, argv, message", [
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lpips-weights=/nowhere/vgg.pth", "--lpips-random-backbone"],
     "--lpips-weights applies with --perceptual-weight above 0 and --lpips-random-backbone false only"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lpips-weights=/nowhere/vgg.pth", "--perceptual-weight=0"],
     "--lpips-weights applies with --perceptual-weight above 0"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lpips-random-backbone", "--perceptual-weight=0"],
     "--lpips-random-backbone applies with --perceptual-weight above 0 only"),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--inception-weights=/nowhere/inception.pth"],
     "--inception-weights applies with --eval-fid true only"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--inception-weights=/nowhere/inception.pth"],
     "--inception-weights applies with --eval-fid true only"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--vqgan=/nowhere/vqgan.pt", "--sample-count=0"],
     "--vqgan applies with --sample-count above 0 or --eval-fid true only"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--sample-temperature=0.5", "--sample-count=0"],
     "--sample-temperature applies with --sample-count above 0"),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--eval-fid-samples=100"], "--eval-fid-samples applies with --eval-fid"),
])
def test_settings_this_run_would_not_use_are_refused(cls, presets, argv, message, capsys):
    assert message in refused(cls, presets, argv, capsys)


@pytest.mark.parametrize("cls, presets, argv", [
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lpips-weights=w.pth"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*VQGAN_BASE, "--lpips-random-backbone", "--eval-fid", "--inception-weights=i"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--vqgan=v.pt", "--sample-count=0", "--eval-fid"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, [*GPT_BASE, "--vqgan=v.pt", "--sample-top-k=5"]),
])
def test_the_same_settings_are_taken_where_they_apply(cls, presets, argv):
    parse_config(cls, presets, argv)


from tests.test_hardening import chain  # noqa: E402,F401  a random VQGAN -> tokens -> GPT chain, 6 classes


def test_sample_complete_refuses_cfg_on_images_without_labels(chain, tmp_path):
    import sample
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", per_class=1)   # a plain image folder: no labels
    base = ["--gpt", str(chain / "gpt"), "--out", str(tmp_path / "out"), "--n", "2", "--device", "cpu",
            "--complete", str(folder), "--keep-rows", "2"]
    with pytest.raises(ConfigError, match="--cfg guides each completion .* holds no labels"):
        sample.main(parse_config(SampleConfig, SAMPLE_PRESETS, [*base, "--cfg", "3"]))
    assert not (tmp_path / "out").exists()
    assert sample.main(parse_config(SampleConfig, SAMPLE_PRESETS, base)) == 0


def test_sample_n_no_machine_holds_stops_in_one_line(chain, tmp_path, capsys):
    import sample
    from vqgpt.errors import exit_on_user_error

    cfg = parse_config(SampleConfig, SAMPLE_PRESETS, ["--gpt", str(chain / "gpt"), "--out", str(tmp_path / "out"),
                                                      "--n", str(10**12), "--device", "cpu"])
    assert exit_on_user_error(lambda: sample.main(cfg), "sample") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sample: error: not enough memory"), err
