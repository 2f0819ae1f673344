"""Bad input and faults from an adversarial run: nothing lost, nothing outside its folder, one line each."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import sample
import train_gpt
from models.gpt import GPT, GPT_PRESETS
from models.vqgan import VQGAN, VQGAN_PRESETS
from plots.__main__ import main as plots_main
from tests.conftest import make_image_folder
from tests.helpers import ROOT, overridden, run_shardify, script_env
from vqgpt import dataprep, files
from vqgpt.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from vqgpt.config import ConfigError, config_to_dict, parse_config
from vqgpt.settings import (GPT_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GPTTrainConfig, QuantizeConfig, SampleConfig,
                            ShardifyConfig, VQGANTrainConfig)
from vqgpt.dataprep import DataPrepError, builtin_source, scan_folder, write_shards
from vqgpt.distributed import DistInfo, pick_device
from vqgpt.errors import RunError
from vqgpt.images import load_square_image
from vqgpt.quantize import RECEIPTS_DIR, background_batches, quantize
from vqgpt.shards import (ShardError, ShardLoader, ShardSplit, ShardWriter, build_manifest, read_manifest,
                          write_manifest)
from vqgpt.trained_models import load_vqgan
from vqgpt.training import TrainingRun

DEAD_PID = 4194399   # above any Linux pid_max: no process has it


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A trainer that raises leaves its SIGINT/SIGTERM handlers installed; put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def token_set(root: Path, codebook_size=16, grid=(2, 2), classes=("a", "b"), train=32, val=16, val_id=None,
              dtype=np.uint16, seed=0, **manifest_fields) -> Path:
    """A small token shard folder as image_quantizer.py writes it (random ids, labelled)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = {}
    for split, count in (("train", train), ("val", val)):
        items = rng.integers(0, codebook_size, (count, grid[0] * grid[1])).astype(dtype)
        if split == "val" and val_id is not None:
            items[0, 0] = val_id
        labels = (np.arange(count) % len(classes)).astype(np.int16)
        records[split] = [ShardWriter.write_shard(root, f"{split}_00000", items, labels)]
    fields = {"codebook_size": codebook_size, "latent_grid": list(grid), **manifest_fields}
    write_manifest(root, build_manifest("tokens", (grid[0] * grid[1],), dtype, records, list(classes),
                                        **{k: v for k, v in fields.items() if v is not None}))
    return root


def gpt_cfg(tokens: Path, out: Path, *extra: str) -> GPTTrainConfig:
    return parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, overridden([
        "--preset=tiny", f"--tokens={tokens}", f"--out={out}", "--max-steps=2", "--batch-size=8", "--warmup-steps=1",
        "--eval-every=0", "--ckpt-every=1", "--log-every=1", "--sample-count=0", "--n-layer=1", "--n-head=2",
        "--n-embd=32", "--device=cpu", "--eval-batch-size=8"], extra))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- data loss ---------------------------------------------------------------------------------------------------

def test_an_eval_that_fails_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch):
    def failing_eval(*args, **kwargs):
        raise RuntimeError("eval failed")

    monkeypatch.setattr(train_gpt, "validation_loss", failing_eval)
    with pytest.raises(RuntimeError, match="eval failed"):
        train_gpt.main(gpt_cfg(token_set(tmp_path / "tokens"), tmp_path / "run", "--eval-every=2", "--ckpt-every=2"))
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002.pt"


@pytest.mark.parametrize("change, message", [
    (dict(val_id=16), "outside the codebook"),            # the first class token: an eval-time crash before
    (dict(latent_grid=None), "lacks latent_grid"),        # needed by the first sample grid
])
def test_what_eval_needs_is_checked_before_step_one(tmp_path, change, message):
    run = tmp_path / "run"
    with pytest.raises((ShardError, RunError), match=message):
        train_gpt.main(gpt_cfg(token_set(tmp_path / "tokens", **change), run))
    assert latest_checkpoint(run) is None and not (run / "metrics.jsonl").exists()


def test_resume_from_another_run_never_touches_the_out_folder(tmp_path):
    tokens = token_set(tmp_path / "tokens")
    first, other = tmp_path / "first", tmp_path / "other"
    train_gpt.main(gpt_cfg(tokens, first))
    train_gpt.main(gpt_cfg(tokens, other, "--keep-last=1"))
    before = tree_digest(other)
    with pytest.raises(RunError, match="holds another run"):
        train_gpt.main(gpt_cfg(tokens, other, f"--resume={first / 'step_00000001.pt'}", "--max-steps=3",
                               "--keep-last=1"))
    assert tree_digest(other) == before
    # a new folder is a branch: allowed, and the source run is left as it was
    first_before = tree_digest(first)
    train_gpt.main(gpt_cfg(tokens, tmp_path / "branch", f"--resume={first / 'step_00000001.pt'}", "--max-steps=3"))
    assert latest_checkpoint(tmp_path / "branch").name == "step_00000003.pt"
    assert tree_digest(first) == first_before


def shardify_args(src, dest, *extra):
    return [str(src), str(dest), "--size=16", "--workers=1", "--progress=false", "--val-count=2", *extra]


def test_overwrite_keeps_the_finished_set_until_the_new_one_succeeds(tmp_path, capsys, monkeypatch):
    src, dest = make_image_folder(tmp_path / "src"), tmp_path / "out"
    assert run_shardify(shardify_args(src, dest)) == 0
    (dest / "notes.txt").write_text("mine")
    before = tree_digest(dest)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (bad / name).write_text("not a picture")
    capsys.readouterr()
    assert run_shardify(shardify_args(bad, dest, "--overwrite")) == 2
    assert "skipped" in one_error_line(capsys)
    assert tree_digest(dest) == before

    real_write = ShardWriter.write_shard
    calls = {"n": 0}

    def interrupted(*args, **kwargs):   # Ctrl-C between two shards of the new set
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(interrupted))
    assert run_shardify(shardify_args(src, dest, "--overwrite", "--seed=5")) == 130
    assert "interrupted" in one_error_line(capsys)
    staged = {name for name in tree_digest(dest) if name.startswith(".shardify-staging/")}   # kept for the rerun
    assert staged and {k: v for k, v in tree_digest(dest).items() if k not in staged} == before

    monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(real_write))
    import vqgpt.dataprep as dataprep

    real_replace = os.replace

    def failing_manifest_move(src, dst):   # the swap fails at its last move: the old set must come back
        if Path(dst) == dest / "manifest.json" and Path(src).parent.name == dataprep.STAGING_NAME:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(dataprep.os, "replace", failing_manifest_move)
        assert run_shardify(shardify_args(src, dest, "--overwrite", "--seed=5")) == 2
    assert "previous set is back" in one_error_line(capsys)
    assert tree_digest(dest) == before and not (dest / dataprep.PREVIOUS_NAME).exists()
    listed = dest / "val_00000.npy"   # a shard the manifest lists, replaced by a folder: refused, nothing moved
    listed.rename(tmp_path / "saved.npy")
    listed.mkdir()
    changed = tree_digest(dest)
    assert run_shardify(shardify_args(src, dest, "--overwrite", "--seed=5")) == 2
    assert "is a folder or link" in one_error_line(capsys) and tree_digest(dest) == changed
    listed.rmdir()
    (tmp_path / "saved.npy").rename(listed)

    few = make_image_folder(tmp_path / "few", per_class=2)
    assert run_shardify(shardify_args(few, dest, "--overwrite")) == 0
    assert (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in dest.glob("*.npy")) == ["train_00000.npy", "train_00000_labels.npy",
                                                          "val_00000.npy", "val_00000_labels.npy"]
    assert len(ShardSplit(dest, "train", verify_hashes=True)) == 2


def test_source_as_dest_and_lookalike_files_are_never_deleted(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src")
    before = tree_digest(src)
    assert run_shardify(shardify_args(src, src, "--overwrite")) == 2
    assert "source folder" in one_error_line(capsys)
    assert tree_digest(src) == before

    dest = tmp_path / "mine"
    dest.mkdir()
    np.save(dest / "train_00000.npy", np.arange(5))   # the user's own array, named like a shard
    (dest / "val_00003_labels.npy").write_bytes(b"also mine")
    before = tree_digest(dest)
    assert run_shardify(shardify_args(src, dest, "--overwrite")) == 2
    assert "named like shards" in one_error_line(capsys)
    assert tree_digest(dest) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "another tool"}')
    assert run_shardify(shardify_args(src, foreign, "--overwrite")) == 2
    assert "did not write" in one_error_line(capsys)
    assert (foreign / "manifest.json").read_text() == '{"name": "another tool"}'


# ---- outside the folders -----------------------------------------------------------------------------------------

def test_latest_that_names_a_path_outside_the_run_is_ignored(tmp_path):
    run = tmp_path / "run"
    for folder in (tmp_path / "other", run):
        folder.mkdir()
    save_checkpoint(tmp_path / "other", 9, {"step": 9})
    save_checkpoint(run, 1, {"step": 1})
    for pointer in ("../other/step_00000009.pt", str(tmp_path / "other" / "step_00000009.pt")):
        (run / "latest").write_text(pointer + "\n")
        assert latest_checkpoint(run) == run / "step_00000001.pt"


def test_a_link_planted_at_a_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(draws))
    os.symlink(victim, run / f".latest.{os.getpid()}.tmp")            # the name the writer used to pick
    os.symlink(victim, run / f".latest.{os.getpid()}.aaaaaaaa.tmp")   # the first name it draws now
    files.atomic_write_bytes(run / "latest", b"step_00000001.pt\n")
    assert victim.read_text() == "precious"
    assert not (run / "latest").is_symlink() and (run / "latest").read_bytes() == b"step_00000001.pt\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples"])
def test_links_inside_a_run_folder_are_refused(tmp_path, name):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    if name == "samples":
        elsewhere.mkdir()
    else:
        elsewhere.write_text("")
    os.symlink(elsewhere, run / name)
    with pytest.raises(RunError, match="is a link"):
        train_gpt.main(gpt_cfg(token_set(tmp_path / "tokens"), run))
    assert (elsewhere.is_dir() and not any(elsewhere.iterdir())) or elsewhere.read_text() == ""


def test_dead_writers_temporaries_are_cleared_at_start_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = run / f".step_00000004.pt.{DEAD_PID}.0123abcd.tmp"       # kill -9 mid-save
    live = run / f".step_00000003.pt.{os.getppid()}.abcdef12.tmp"   # a live writer's
    live_digits = run / f".step_00000005.pt.{os.getppid()}.12345678.tmp"   # its random part all digits: not a PID
    users = [run / ".notes.tmp", run / f".notes.{DEAD_PID}.tmp", run / f".draft.{DEAD_PID}.xyz.tmp"]   # not our names
    for path in (dead, live, live_digits, *users):
        path.write_bytes(b"x")
    cfg = SimpleNamespace(out=str(run), resume="auto")
    assert TrainingRun(cfg, DistInfo(0, 0, 1, torch.device("cpu"), True), "gpt", ()).load_resume_state() is None
    assert not dead.exists()
    assert live.exists() and live_digits.exists() and all(path.exists() for path in users)


# ---- silent wrong results ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id, dtype", [(16, np.uint16), (18, np.uint16), (999, np.uint16), (-1, np.int32)])
def test_token_ids_outside_the_codebook_are_refused_when_opened(tmp_path, bad_id, dtype):
    folder = token_set(tmp_path / "t", val_id=bad_id, dtype=dtype)   # 16 = first class token, 18 = start token
    ShardSplit(folder, "train")
    with pytest.raises(ShardError, match=r"val_00000.npy: token ids .* outside the codebook \[0, 16\)"):
        ShardSplit(folder, "val")


@pytest.mark.parametrize("cls, presets, argv", [
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--lr=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--lr=inf"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--beta2=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--beta2=1.5"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--weight-decay=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--grad-clip=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--sample-temperature=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--dropout=1.5"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--dropout=nan"]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--seed=-1"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--beta=nan"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--l1-weight=nan"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--perceptual-weight=-1"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--disc-weight=inf"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--adam-betas=nan,0.9"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--min-lr-ratio=nan"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--permuted-share=1.5", "--permute-channels"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--permuted-share=nan", "--permute-channels"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--min-lr-ratio=5"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--dead-code-steps=-5"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--muon-lr-scale=0", "--optimizer=muon"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--attn-resolutions=5"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--l1-weight=0", "--l2-weight=0", "--perceptual-weight=0"]),
    (VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--out="]),
    (GPTTrainConfig, GPT_TRAIN_PRESETS, ["--out="]),
])
def test_non_finite_and_out_of_range_settings_are_refused_when_parsed(cls, presets, argv, capsys):
    required = ["--data=d"] if cls is VQGANTrainConfig else ["--tokens=t"]   # so that only the value is wrong
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, presets, ["--preset=tiny", *required, *argv])
    assert exit_info.value.code == 2
    flag = argv[0].split("=")[0]
    message = capsys.readouterr().err.strip().splitlines()[-1]   # the error line, not the usage above it
    assert "error:" in message and (flag in message or flag.lstrip("-").replace("-", "_") in message), message


@pytest.mark.parametrize("cls, argv, message", [
    (QuantizeConfig, ["--vqgan=v", "--data=d", "--out="], "--out must not be empty"),
    (SampleConfig, ["--gpt=g", "--out= "], "--out must not be empty"),
    (ShardifyConfig, ["--builtin=shapes", ""], "must not be empty")])
def test_an_empty_output_path_is_refused_not_the_working_directory(cls, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, {}, argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--val-fraction=-0.5"], ["--val-fraction=nan"], ["--val-fraction=1"],
                                  ["--seed=-1"], ["--workers=-1"], ["--val-count=-3"]])
def test_shardify_settings_are_refused_when_parsed(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_shardify([str(tmp_path), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert argv[0].split("=")[0] in err and "unrecognized" not in err, err   # refused for its value, by name


def test_builtin_count_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_shardify(["--builtin", "shapes", str(tmp_path / "out"), "--builtin-count=-1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--builtin-count" in err and "unrecognized" not in err, err


@pytest.mark.parametrize("device", ["meta", "xla", "nonsense"])
def test_devices_nothing_trains_on_are_refused(device):
    with pytest.raises(RunError, match="--device must be"):
        pick_device(device)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0])), "listed twice"),
    (lambda m: m["splits"]["val"]["shards"][0].update(file="train_00000.npy"), "in both 'train' and 'val'"),
])
def test_a_shard_listed_twice_is_refused(tmp_path, change, message):
    folder = token_set(tmp_path / "t")
    edit_manifest(folder, change)
    with pytest.raises(ShardError, match=message):
        ShardSplit(folder, "train")


def test_a_val_split_emptied_by_skipped_files_is_refused(tmp_path):
    src = make_image_folder(tmp_path / "src")
    source = scan_folder(src)
    val_index = int(dataprep.split_order(len(source), 0, 1)["val"][0])
    (src / source.files[val_index]).write_bytes(b"broken")
    with pytest.raises(DataPrepError, match="validation images were skipped"):
        write_shards(source, tmp_path / "out", size=16, val_count=1, workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_float_images_in_unit_range_are_not_black(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "half.tif")
    assert abs(int(load_square_image(tmp_path / "half.tif", 8)[4, 4, 0]) - 128) <= 1
    Image.fromarray(np.full((8, 8), 200.0, np.float32), mode="F").save(tmp_path / "bytes.tif")
    assert abs(int(load_square_image(tmp_path / "bytes.tif", 8)[4, 4, 0]) - 200) <= 1


def test_twelve_bit_values_in_a_sixteen_bit_png_keep_their_brightness(tmp_path):
    from PIL import PngImagePlugin

    half_of_12_bits = Image.fromarray(np.full((8, 8), 2048, np.uint16))
    marked = PngImagePlugin.PngInfo()
    marked.add(b"sBIT", bytes([12]))   # the scanner's significant bits, which Pillow itself ignores
    half_of_12_bits.save(tmp_path / "scan12.png", pnginfo=marked)
    assert abs(int(load_square_image(tmp_path / "scan12.png", 8)[4, 4, 0]) - 128) <= 1
    half_of_12_bits.save(tmp_path / "plain16.png")   # without sBIT the samples are read as full 16-bit values
    assert abs(int(load_square_image(tmp_path / "plain16.png", 8)[4, 4, 0]) - 8) <= 1


def test_a_thin_strip_is_cropped_before_resizing(tmp_path, monkeypatch):
    strip = np.zeros((1, 60000, 3), np.uint8)
    strip[:, 30000:] = 200
    Image.fromarray(strip).save(tmp_path / "strip.png")
    real_resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 4 * 16 * 16, f"resize to {size} would allocate far more than the output"
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    image = load_square_image(tmp_path / "strip.png", 16)
    assert image.shape == (16, 16, 3)


# ---- tracebacks that should be one line --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "npz"])
def test_zero_byte_and_npz_shards_are_a_shard_error(tmp_path, kind):
    folder = token_set(tmp_path / "t")
    path = folder / "train_00000.npy"
    if kind == "empty":
        path.write_bytes(b"")
    else:
        with open(path, "wb") as handle:
            np.savez(handle, a=np.zeros(3))
    with pytest.raises(ShardError, match="train_00000.npy: not a"):
        ShardSplit(folder, "train")


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (None, "is not an object"),
    ("bool", "invalid count"),
])
def test_malformed_manifests_are_a_shard_error(tmp_path, text, message):
    folder = token_set(tmp_path / "t")
    if text and text != "bool":
        (folder / "manifest.json").write_text(text)
    elif text == "bool":
        edit_manifest(folder, lambda m: m["splits"]["train"]["shards"][0].update(count=True))
    else:
        edit_manifest(folder, lambda m: m["splits"].update(val=["not", "an", "object"]))
    with pytest.raises(ShardError, match=message):
        ShardSplit(folder, "train")


@pytest.mark.parametrize("field, value", [("config", [1, 2]), ("step", "7"), ("stage", 3), ("step", -1)])
def test_checkpoints_with_wrong_types_are_a_checkpoint_error(tmp_path, field, value):
    state = {"stage": "gpt", "step": 1, "config": {}, field: value}
    torch.save(state, tmp_path / "step_00000001.pt")
    with pytest.raises(CheckpointError, match=f"field '{field}'"):
        load_checkpoint(tmp_path / "step_00000001.pt")


def test_resuming_a_checkpoint_whose_state_is_not_a_dict_is_one_error(tmp_path):
    tokens, run = token_set(tmp_path / "tokens"), tmp_path / "run"
    train_gpt.main(gpt_cfg(tokens, run))
    state = torch.load(run / "step_00000002.pt", weights_only=True)
    state["optimizer"] = [1, 2, 3]
    torch.save(state, run / "step_00000002.pt")
    with pytest.raises(CheckpointError, match="optimizer should hold a state dict"):
        train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3"))


def test_any_pillow_parser_error_skips_the_file(tmp_path, monkeypatch):
    src = make_image_folder(tmp_path / "src", per_class=3)
    real_open = Image.open

    def crashing_parser(path, *args, **kwargs):
        if str(path).endswith("img_1.jpg"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        if str(path).endswith("img_2.png"):
            raise KeyError("broken tag")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", crashing_parser)
    manifest = write_shards(scan_folder(src), tmp_path / "out", size=16, val_count=0, workers=1, progress=False)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"cats/img_1.jpg", "dogs/img_1.jpg", "cats/img_2.png", "dogs/img_2.png"}
    assert "struct" in reasons["cats/img_1.jpg"] or "unpack" in reasons["cats/img_1.jpg"]


def test_dest_that_is_a_file_is_one_line(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src")
    (tmp_path / "dest").write_text("a file")
    assert run_shardify(shardify_args(src, tmp_path / "dest")) == 2
    assert "is a file" in one_error_line(capsys)
    assert (tmp_path / "dest").read_text() == "a file"


def test_manifest_does_not_change_when_the_source_moves(tmp_path, monkeypatch):
    real_open = Image.open

    def deny(path, *args, **kwargs):
        if str(path).endswith("img_3.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    make_image_folder(tmp_path / "a" / "pets")
    make_image_folder(tmp_path / "b" / "pets")
    write_shards(scan_folder(tmp_path / "a" / "pets"), tmp_path / "one", size=16, val_count=2, workers=1, progress=False)
    write_shards(scan_folder(tmp_path / "b" / "pets"), tmp_path / "two", size=16, val_count=2, workers=1, progress=False)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_reader_thread_ends_when_its_consumer_is_gone(tmp_path, monkeypatch):
    split = ShardSplit(token_set(tmp_path / "t", train=64), "train")
    loader = ShardLoader(split, 4, prefetch=1)
    real_read = split.read
    calls = {"n": 0}

    def failing_read(indices, corners=None):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError("disk went away")
        return real_read(indices)

    monkeypatch.setattr(split, "read", failing_read)
    next(loader)
    time.sleep(0.5)   # batch 2 waits in the queue; the error has nowhere to go
    thread = loader._thread
    loader.close()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_quantizer_reader_thread_ends_when_encoding_fails():
    before = set(threading.enumerate())
    batches = background_batches(np.zeros((40, 4, 4, 3), np.uint8), 1, False, False, depth=1)
    next(batches)
    producers = set(threading.enumerate()) - before
    assert producers   # the reader thread, about to block on the full queue (depth 1, 39 batches left)
    batches.close()   # what a failing encoder does to the generator: it must not leave the reader blocked
    for thread in producers:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_demo_stage_failure_is_one_line(tmp_path):   # one image: all of it val, none to train on
    result = subprocess.run([sys.executable, "demo.py", "--out", str(tmp_path / "demo"), "--nproc", "1",
                             "--images", "1"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("demo: error: stage '1/6")


def test_resuming_a_state_that_does_not_fit_is_one_error(tmp_path):
    tokens, run = token_set(tmp_path / "tokens"), tmp_path / "run"
    train_gpt.main(gpt_cfg(tokens, run))
    state = torch.load(run / "step_00000002.pt", weights_only=True)
    for key, value, error, message in (("gpt", {"nonsense": torch.zeros(1)}, CheckpointError, "'gpt' state does not fit"),
                                       ("optimizer", {"state": {}}, CheckpointError, "'optimizer' state does not fit"),
                                       ("loader", {"epoch": "x"}, ShardError, "reader state")):
        torch.save({**state, key: value}, run / "step_00000002.pt")
        with pytest.raises(error, match=message):
            train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3"))


def test_resuming_on_other_data_of_the_same_size_is_refused(tmp_path):
    run = tmp_path / "run"
    train_gpt.main(gpt_cfg(token_set(tmp_path / "tokens"), run))
    with pytest.raises(ShardError, match="other shards than the checkpoint"):
        train_gpt.main(gpt_cfg(token_set(tmp_path / "other", seed=1), run, "--max-steps=3"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Image shards -> a random tiny VQGAN -> token shards -> a random one-layer GPT bound to them (no training)."""
    root = tmp_path_factory.mktemp("chain")
    write_shards(builtin_source("shapes", 48), root / "shards", size=32, shard_size=16, val_count=8, workers=1,
                 progress=False)
    torch.manual_seed(0)
    vqgan_config = VQGAN_PRESETS["tiny"]
    (root / "vqgan").mkdir()
    save_checkpoint(root / "vqgan", 0, {"stage": "vqgan", "step": 0, "config": config_to_dict(vqgan_config),
                                        "vqgan": VQGAN(vqgan_config).state_dict()})
    dist = DistInfo(0, 0, 1, torch.device("cpu"), True)
    quantize(load_vqgan(root / "vqgan"), root / "shards", root / "tokens", batch_size=16, flip=False, dist=dist,
             dtype=torch.float32, progress=False)
    manifest = read_manifest(root / "tokens")
    gpt_config = GPT_PRESETS["tiny"].__class__(codebook_size=manifest["codebook_size"], n_classes=6,
                                               tokens_per_image=manifest["item_shape"][0], n_layer=1, n_head=2,
                                               n_embd=32)
    (root / "gpt").mkdir()
    save_checkpoint(root / "gpt", 1, {"stage": "gpt", "step": 1, "config": config_to_dict(gpt_config),
                                      "gpt": GPT(gpt_config).state_dict(), "token_manifest": manifest})
    return root


def test_hand_edited_quantizer_receipts_are_redone_not_a_traceback(chain, tmp_path):
    import shutil

    tokens = tmp_path / "tokens"
    shutil.copytree(chain / "tokens", tokens)
    receipts = sorted((tokens / RECEIPTS_DIR).glob("*.json"))
    receipts[0].write_text("{not json")
    edited = json.loads(receipts[1].read_text())
    receipts[1].write_text(json.dumps({**edited, "count": edited["count"] + 1}))
    receipts[2].write_text("[1, 2]")
    dist = DistInfo(0, 0, 1, torch.device("cpu"), True)
    quantize(load_vqgan(chain / "vqgan"), chain / "shards", tokens, batch_size=16, flip=False, dist=dist,
             dtype=torch.float32, progress=False)
    assert len(ShardSplit(tokens, "train", verify_hashes=True)) == 40
    assert json.loads(receipts[1].read_text())["count"] == edited["count"]


def test_sample_completion_refuses_rows_beyond_the_grid_and_other_classes(chain, tmp_path):
    base = ["--gpt", str(chain / "gpt"), "--out", str(tmp_path / "out"), "--n", "2", "--device", "cpu"]
    with pytest.raises(ConfigError, match="--keep-rows 99 exceeds the 8 token rows"):
        sample.main(parse_config(SampleConfig, {}, [*base, "--complete", str(chain / "shards"), "--keep-rows", "99"]))
    pets = tmp_path / "pets"
    write_shards(scan_folder(make_image_folder(tmp_path / "pets_src", per_class=3)), pets, size=32, val_count=2,
                 workers=1, progress=False)
    with pytest.raises(ConfigError, match="are not the GPT's"):
        sample.main(parse_config(SampleConfig, {}, [*base, "--complete", str(pets), "--keep-rows", "2"]))
    assert sample.main(parse_config(SampleConfig, {}, [*base, "--complete", str(chain / "shards"), "--keep-rows", "2"])) == 0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"stage": "other"}', '{"config": {}}'])
def test_plots_refuse_a_bad_config_json_in_one_line(tmp_path, text, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1.0}\n')
    (run / "config.json").write_text(text)
    assert plots_main([str(run), "--out", str(tmp_path / "figures")]) == 2
    assert "not the config of a vqgan or gpt run" in one_error_line(capsys)


def test_demo_refuses_to_mix_outputs_made_with_other_arguments(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(demo, "run_stage", lambda title, command, done: ran.append(title))
    assert demo.main(["--out", str(tmp_path / "demo"), "--images", "100", "--vqgan-steps", "5"]) == 0
    assert demo.main(["--out", str(tmp_path / "demo"), "--images", "100", "--vqgan-steps", "5"]) == 0
    count = len(ran)
    capsys.readouterr()
    assert demo.main(["--out", str(tmp_path / "demo"), "--images", "200", "--vqgan-steps", "5"]) == 2
    assert "was made with" in one_error_line(capsys) and len(ran) == count


def test_every_user_error_is_one_line_exit_2_and_errors_imports_nothing(capsys):
    from vqgpt.errors import UserError, exit_on_user_error
    from vqgpt.fid import InceptionWeightsError

    def raising(error):
        def main():
            raise error
        return main

    for cls in (RunError, ConfigError, ShardError, CheckpointError, DataPrepError, InceptionWeightsError):
        assert issubclass(cls, UserError), cls
    from models.perceptual import LPIPSWeightsMissing

    for error in (RunError("a"), ConfigError("b"), ShardError("c"), CheckpointError("d"), DataPrepError("e"),
                  InceptionWeightsError("f"), PermissionError(13, "Permission denied", "/run"), LPIPSWeightsMissing("g")):
        assert exit_on_user_error(raising(error), "prog") == 2
        assert one_error_line(capsys).startswith("prog: error: ")
    code = "import sys, vqgpt.errors; print(sorted(m for m in sys.modules if m.startswith(('vqgpt', 'models'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "['vqgpt', 'vqgpt.errors']", result.stdout + result.stderr
    # nor does models/: networks only, usable without the library
    code = ("import sys, pathlib, importlib; [importlib.import_module('models.' + p.stem) for p in "
            "pathlib.Path('models').glob('*.py')]; print(sorted(m for m in sys.modules if m.startswith('vqgpt')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def train_three_steps_spoiling_the_third(chain, run, function_name: str, spoil, *extra: str) -> tuple[dict, dict]:
    """Checkpoints before and after a VQGAN step (GAN active, BatchNorm in the forward) whose third call of
    train_resnet_vqgan.<function_name> was passed through `spoil`."""
    import train_resnet_vqgan

    real = getattr(train_resnet_vqgan, function_name)
    calls = {"n": 0}

    def third_spoiled(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return spoil(out) if calls["n"] == 3 else out

    cfg = parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [
        "--preset=tiny", f"--data={chain / 'shards'}", f"--out={run}", "--max-steps=3", "--batch-size=4",
        "--warmup-steps=1", "--disc-start=0", "--eval-every=0", "--ckpt-every=1", "--log-every=1", "--keep-last=5",
        "--perceptual-weight=0", "--device=cpu", *extra])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_resnet_vqgan, function_name, third_spoiled)
        train_resnet_vqgan.main(cfg)
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    return tuple(torch.load(run / f"step_0000000{k}.pt", weights_only=True) for k in (2, 3))


@pytest.fixture(scope="module")
def skipped_step(chain, tmp_path_factory):
    """A step whose batch was all NaN (with a weight EMA, which the skip must leave alone too)."""
    return train_three_steps_spoiling_the_third(chain, tmp_path_factory.mktemp("skipped") / "run", "to_unit_range",
                                                lambda images: torch.full_like(images, float("nan")), "--ema-decay=0.5")


def test_a_step_skipped_after_a_finite_forward_undoes_what_the_forward_changed(chain, tmp_path):
    """A finite batch, then a non-finite loss term (as an fp16 overflow or a NaN GAN term would give): the
    forward had changed BatchNorm statistics and counted code usage; the skip puts them back and ages no code."""
    def nan_loss(result):
        recon, terms = result
        return recon, {**terms, "l1": torch.tensor(float("nan"))}

    before, after = train_three_steps_spoiling_the_third(chain, tmp_path / "run", "generator_backward", nan_loss)
    assert after["skipped_steps"] == 1
    for key in ("vqgan", "discriminator"):
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), f"{key}.{name} changed in a skipped step"


def test_a_non_finite_batch_leaves_weights_optimizers_and_batchnorm_untouched(skipped_step):
    before, after = skipped_step
    assert after["skipped_steps"] == 1
    for key in ("vqgan", "discriminator", "vqgan_ema"):   # parameters and buffers: BatchNorm statistics, codebook
        for name, tensor in before[key].items():
            if name.endswith("steps_unused"):
                continue   # see the next test
            assert torch.equal(tensor, after[key][name]), f"{key}.{name} changed in a skipped step"
    for key in ("opt_g", "opt_d"):
        assert before[key]["state"].keys() == after[key]["state"].keys()
        for index, state in before[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, after[key]["state"][index][name]), f"{key} {index}.{name} changed"


def test_a_non_finite_batch_leaves_the_dead_code_counters_untouched(skipped_step):
    before, after = skipped_step
    assert torch.equal(before["vqgan"]["quantizer.steps_unused"], after["vqgan"]["quantizer.steps_unused"])


@pytest.mark.parametrize("field, value, message", [("vqgan_checkpoint", ["a"], "vqgan_checkpoint"),
                                                   ("classes", [1, 2], "not all names"),
                                                   ("codebook_size", "16", "codebook_size"),
                                                   ("latent_grid", [3, 3], "latent_grid")])
def test_bad_token_manifest_fields_are_a_shard_error(tmp_path, field, value, message):
    folder = token_set(tmp_path / "t")
    edit_manifest(folder, lambda m: m.update({field: value}))
    with pytest.raises(ShardError, match=message):
        ShardSplit(folder, "train")


@pytest.mark.parametrize("field, value", [("n_layer", "2"), ("n_layer", True), ("dropout", [0.1]), ("n_head", 3)])
def test_a_saved_config_of_the_wrong_types_is_a_config_error(chain, tmp_path, field, value):
    from vqgpt.trained_models import load_gpt

    state = torch.load(latest_checkpoint(chain / "gpt"), weights_only=True)
    state["config"][field] = value
    (tmp_path / "gpt").mkdir()
    save_checkpoint(tmp_path / "gpt", 1, state)
    with pytest.raises(ConfigError, match="saved config"):
        load_gpt(tmp_path / "gpt")


def test_only_the_main_rank_prints_a_user_error(capsys, monkeypatch):
    from vqgpt.errors import exit_on_user_error

    def failing():
        raise RunError("same on every rank")

    monkeypatch.setenv("RANK", "1")   # torchrun's rank of this process
    assert exit_on_user_error(failing, "prog") == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert exit_on_user_error(failing, "prog") == 2
    assert capsys.readouterr().err == "prog: error: same on every rank\n"
    monkeypatch.delenv("RANK")   # a plain `python` run
    assert exit_on_user_error(failing, "prog") == 2 and capsys.readouterr().err != ""


def test_resume_restores_every_tracked_object_and_the_skipped_step_count(tmp_path):
    tokens, run = token_set(tmp_path / "tokens"), tmp_path / "run"
    train_gpt.main(gpt_cfg(tokens, run))
    state = torch.load(run / "step_00000002.pt", weights_only=True)
    assert {"gpt", "optimizer", "scaler", "loader", "skipped_steps", "token_manifest"} <= set(state)
    state["skipped_steps"] = 5
    torch.save(state, run / "step_00000002.pt")
    train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3"))
    resumed = torch.load(run / "step_00000003.pt", weights_only=True)
    assert resumed["skipped_steps"] == 5 and resumed["loader"] != state["loader"]
    del state["optimizer"]
    torch.save(state, run / "step_00000003.pt")
    with pytest.raises(CheckpointError, match="optimizer should hold a state dict"):
        train_gpt.main(gpt_cfg(tokens, run, "--max-steps=4"))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_error_for_inference(tmp_path):
    from vqgpt.trained_models import load_gpt

    tokens, run = token_set(tmp_path / "tokens"), tmp_path / "run"
    train_gpt.main(gpt_cfg(tokens, run))
    state = torch.load(run / "step_00000002.pt", weights_only=True)
    state["gpt"] = {key: value[:1] if value.dim() else value for key, value in state["gpt"].items()}   # wrong shapes
    torch.save(state, run / "step_00000002.pt")
    with pytest.raises(CheckpointError, match="weights do not fit its config"):
        load_gpt(run)


def test_json_artifacts_are_strict_json_even_with_nan(tmp_path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    files.atomic_write_json(tmp_path / "result.json", {"fid": float("nan"), "is": [1.5, float("inf")],
                                                       "nested": {"x": -float("inf"), "ok": 2}})
    parsed = json.loads((tmp_path / "result.json").read_text(), parse_constant=refuse)
    assert parsed == {"fid": None, "is": [1.5, None], "nested": {"x": None, "ok": 2}}


def test_milestone_checkpoints_survive_pruning(tmp_path):
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2, keep_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000004.pt", "step_00000008.pt", "step_00000009.pt", "step_00000010.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000010.pt"


@pytest.mark.parametrize("flag", ["--vqgan-steps=0", "--gpt-steps=-1", "--images=0", "--nproc=0"])
def test_demo_refuses_counts_that_would_fall_back_to_the_presets(flag, capsys):
    import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args([flag])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
