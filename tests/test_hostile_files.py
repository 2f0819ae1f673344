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
