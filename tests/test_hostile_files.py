"""Files that lie (issue 33): links and names that lead out of their folder, data that is not what its manifest
says, bytes changed under an unchanged manifest, damaged run records. Each is one line, exit 2, nothing lost."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train_gpt
import train_resnet_vqgan
from tests.test_hardening import chain, edit_manifest, gpt_cfg, keep_signal_handlers, token_set, tree_digest  # noqa: F401
from vqgpt import quantize as quantize_module
from vqgpt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from vqgpt.config import parse_config
from vqgpt.distributed import DistInfo
from vqgpt.errors import RunError, UserError, exit_on_user_error
from vqgpt.export import export_run
from vqgpt.quantize import RECEIPTS_DIR, quantize
from vqgpt.settings import VQGAN_TRAIN_PRESETS, SampleConfig, VQGANTrainConfig
from vqgpt.shards import ShardError, ShardSplit, ShardWriter, build_manifest, read_manifest, write_manifest
from vqgpt.trained_models import load_bound_vqgan, load_vqgan

CPU = DistInfo(0, 0, 1, torch.device("cpu"), True)


def one_line_exit_2(capsys, action) -> str:
    """`action` as a script's main runs it: exit status 2 and one line, no traceback."""
    assert exit_on_user_error(action, "prog") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture
def gpt_run(tmp_path):
    """Token shards and a GPT run of two steps on them (step_00000001.pt, step_00000002.pt)."""
    tokens, run = token_set(tmp_path / "tokens"), tmp_path / "run"
    train_gpt.main(gpt_cfg(tokens, run))
    return tokens, run


def quantize_chain(chain, shards: Path, out: Path) -> dict:
    return quantize(load_vqgan(chain / "vqgan"), shards, out, batch_size=16, flip=False, dist=CPU,
                    dtype=torch.float32, progress=False)


# ---- 1. reads outside the named folders ---------------------------------------------------------------------------

def test_a_checkpoint_link_planted_in_a_run_folder_is_not_resumed_from(gpt_run, tmp_path, capsys):
    tokens, run = gpt_run
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copy(run / "step_00000002.pt", elsewhere)
    os.symlink(elsewhere, run / "step_00000009.pt")
    (run / "latest").write_text("step_00000009.pt\n")
    before = tree_digest(run)
    line = one_line_exit_2(capsys, lambda: train_gpt.main(gpt_cfg(tokens, run, "--max-steps=12")))
    assert "step_00000009.pt: is a link pointing outside" in line and tree_digest(run) == before
    (run / "latest").unlink()   # found by its name alone
    with pytest.raises(CheckpointError, match="link pointing outside"):   # sample.py, export.py, --vqgan RUN
        resolve_checkpoint(run)
    (run / "step_00000009.pt").unlink()
    os.symlink(run / "step_00000002.pt", run / "step_00000009.pt")   # a link that stays inside is the file itself
    assert resolve_checkpoint(run).name == "step_00000009.pt"


def test_a_manifest_that_links_out_of_its_shard_folder_is_not_read(tmp_path):
    tokens = token_set(tmp_path / "tokens")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tokens / "manifest.json", tmp_path / "elsewhere" / "manifest.json")
    os.symlink(tmp_path / "elsewhere" / "manifest.json", tokens / "manifest.json")
    with pytest.raises(ShardError, match="manifest.json: is a link pointing outside"):
        ShardSplit(tokens, "train")


def test_a_quantizer_receipt_never_leads_out_of_the_token_folder(chain, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    shutil.copytree(chain / "tokens", tokens)
    secret = tmp_path / "secret_labels.npy"
    np.save(secret, np.zeros(16, np.int16))
    receipt_path = tokens / RECEIPTS_DIR / "train_00000.npy.json"
    receipt = json.loads(receipt_path.read_text())
    receipt_path.write_text(json.dumps({**receipt, "labels_file": "../secret_labels.npy"}))
    hashed = []
    real_sha256 = quantize_module.sha256_file
    monkeypatch.setattr(quantize_module, "sha256_file", lambda path: hashed.append(Path(path)) or real_sha256(path))
    quantize_chain(chain, chain / "shards", tokens)   # the edited receipt's shard is redone
    assert secret.resolve() not in [path.resolve() for path in hashed]
    assert json.loads(receipt_path.read_text())["labels_file"] == "train_00000_labels.npy"
    receipt_path.unlink()
    os.symlink(secret, receipt_path)   # a receipt that is a link out
    with pytest.raises(RunError, match="is a link pointing outside"):
        quantize_chain(chain, chain / "shards", tokens)


# ---- 2. data that is not what it claims --------------------------------------------------------------------------

@pytest.mark.parametrize("items", [np.zeros((4, 32, 32, 3), np.uint16), np.zeros((4, 32, 32, 3), np.int32),
                                   np.zeros((4, 32, 16, 3), np.uint8), np.zeros((4, 32, 32, 4), np.uint8)],
                         ids=["uint16", "int32", "32x16", "4-channels"])
def test_image_shards_that_are_not_uint8_squares_of_rgb_are_refused(tmp_path, items):
    record = ShardWriter.write_shard(tmp_path, "train_00000", items, None)
    write_manifest(tmp_path, build_manifest("images", items.shape[1:], items.dtype, {"train": [record]}, []))
    cfg = parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--preset=tiny", f"--data={tmp_path}",
                                                                f"--out={tmp_path / 'run'}"])
    with pytest.raises(ShardError, match="images must be uint8 \\(S, S, 3\\)"):
        train_resnet_vqgan.load_splits(cfg)


@pytest.mark.parametrize("field, value, message", [("codebook_size", 65536, "codebook_size 65536"),
                                                   ("latent_grid", "half height", "latent_grid"),
                                                   ("latent_grid", None, "lacks its latent_grid")])
def test_token_claims_are_checked_against_the_vqgan(chain, tmp_path, capsys, field, value, message):
    manifest = read_manifest(chain / "tokens")
    rows, columns = manifest["latent_grid"]
    value = [rows // 2, columns * 2] if value == "half height" else value
    if value is None:
        del manifest[field]
    else:
        manifest[field] = value
    with pytest.raises(RunError, match=message):
        load_bound_vqgan(manifest)   # train_gpt's samples, sample.py, evaluate.py
    state = load_checkpoint(chain / "gpt")
    (tmp_path / "gpt").mkdir()
    torch.save({**state, "token_manifest": manifest}, tmp_path / "gpt" / "step_00000001.pt")
    line = one_line_exit_2(capsys, lambda: sample.main(parse_config(SampleConfig, {}, [
        "--gpt", str(tmp_path / "gpt"), "--out", str(tmp_path / "out"), "--n", "2", "--device", "cpu"])))
    assert message.split()[0] in line and not (tmp_path / "out").exists()


# ---- 3. bytes changed under an unchanged manifest ----------------------------------------------------------------

def flip_last_byte(path: Path) -> None:
    """The lowest bit of the last value (little-endian): another valid value, same header."""
    itemsize = np.load(path, mmap_mode="r").dtype.itemsize
    data = bytearray(path.read_bytes())
    data[-itemsize] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["train_00000.npy", "train_00001_labels.npy"])
def test_the_quantizer_refuses_image_shards_changed_under_their_manifest(chain, tmp_path, name):
    shards = tmp_path / "shards"
    shutil.copytree(chain / "shards", shards)
    flip_last_byte(shards / name)
    with pytest.raises(ShardError, match=f"{name}: sha256 does not match"):
        quantize_chain(chain, shards, tmp_path / "tokens")


def test_the_gpt_trainer_refuses_token_bytes_changed_under_their_manifest_also_on_resume(gpt_run, tmp_path):
    tokens, run = gpt_run
    changed = tmp_path / "changed"
    shutil.copytree(tokens, changed)
    flip_last_byte(changed / "train_00000.npy")
    with pytest.raises(ShardError, match="train_00000.npy: sha256 does not match"):
        train_gpt.main(gpt_cfg(changed, tmp_path / "fresh"))
    flip_last_byte(tokens / "val_00000_labels.npy")
    before = tree_digest(run)
    with pytest.raises(ShardError, match="val_00000_labels.npy: sha256 does not match"):
        train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3"))
    assert tree_digest(run) == before


def test_vqgan_verify_reads_every_image_shard(chain, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(chain / "shards", shards)
    flip_last_byte(shards / "val_00000.npy")
    flags = ["--preset=tiny", f"--data={shards}", f"--out={tmp_path / 'run'}"]
    train_resnet_vqgan.load_splits(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, flags))   # headers only
    with pytest.raises(ShardError, match="val_00000.npy: sha256 does not match"):
        train_resnet_vqgan.load_splits(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, [*flags, "--verify"]))


def test_token_ranges_are_recorded_by_the_quantizer_and_trusted_when_opened(chain, tmp_path):
    manifest = read_manifest(chain / "tokens")
    for record in manifest["splits"]["train"]["shards"]:
        tokens = np.load(chain / "tokens" / record["file"])
        assert record["token_range"] == [int(tokens.min()), int(tokens.max())]
    copy = tmp_path / "tokens"
    shutil.copytree(chain / "tokens", copy)
    edit_manifest(copy, lambda m: m["splits"]["train"]["shards"][0].update(token_range=[0, m["codebook_size"]]))
    with pytest.raises(ShardError, match="outside the codebook"):   # the recorded range, not the file, is read
        ShardSplit(copy, "train")
    edit_manifest(copy, lambda m: m["splits"]["train"]["shards"][0].update(token_range="0..3"))
    with pytest.raises(ShardError, match="is not \\[lowest id, highest id\\]"):
        ShardSplit(copy, "train")


# ---- 4. damaged run records --------------------------------------------------------------------------------------

def test_metrics_that_are_not_utf8_are_one_line_on_resume_and_export(gpt_run, tmp_path, capsys):
    tokens, run = gpt_run
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"step": 2, "kind": "eval", "note": "\xff"}\n')
    before = tree_digest(run)
    line = one_line_exit_2(capsys, lambda: train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3")))
    assert "metrics.jsonl: line " in line and "not UTF-8" in line and tree_digest(run) == before
    line = one_line_exit_2(capsys, lambda: export_run(run, tmp_path / "export"))
    assert "not UTF-8" in line and not (tmp_path / "export").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "7", '"a run"', '{"config": [1]}', "{torn"])
def test_a_config_json_that_is_not_a_run_config_is_one_line_on_resume_and_export(chain, gpt_run, tmp_path, capsys,
                                                                                  text):
    tokens, run = gpt_run
    (run / "config.json").write_text(text)
    before = tree_digest(run)
    line = one_line_exit_2(capsys, lambda: train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3")))
    assert "config.json: not a" in line and tree_digest(run) == before
    vqgan_run = tmp_path / "vqgan"
    shutil.copytree(chain / "vqgan", vqgan_run)
    (vqgan_run / "config.json").write_text(text)
    line = one_line_exit_2(capsys, lambda: export_run(vqgan_run, tmp_path / "export"))
    assert "config.json: not a" in line and not (tmp_path / "export").exists()


@pytest.mark.parametrize("step", [10 ** 12, 10 ** 8])
def test_a_checkpoint_claiming_a_step_its_name_cannot_hold_is_refused(gpt_run, capsys, step):
    tokens, run = gpt_run
    state = torch.load(run / "step_00000002.pt", weights_only=True)
    torch.save({**state, "step": step}, run / "step_00000002.pt")
    before = tree_digest(run)
    line = one_line_exit_2(capsys, lambda: train_gpt.main(gpt_cfg(tokens, run, "--max-steps=3")))
    assert f"claims step {step}" in line and tree_digest(run) == before
    with pytest.raises(UserError, match="claims step"):
        export_run(run, run.parent / "export")
