"""The demo's stage chain end to end with a very small budget, then a rerun that skips every stage."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, script_env

pytestmark = pytest.mark.slow   # every stage as a subprocess: `make test-fast` leaves it out


def test_demo_chain_small_budget_and_skip_on_rerun(tmp_path):
    command = [sys.executable, "demo.py", "--out", str(tmp_path / "demo"), "--nproc", "1", "--images", "120",
               "--vqgan-steps", "2", "--gpt-steps", "2"]
    env = {**script_env(), "TORCH_HOME": str(tmp_path / "empty_hub")}   # offline: no VGG weights
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "WITHOUT the perceptual term" in first.stdout and "\nDone in " in first.stdout
    config = json.loads((tmp_path / "demo" / "runs" / "vqgan" / "config.json").read_text())
    assert config["config"]["perceptual_weight"] == 0 and config["lpips_backbone"] == "off"
    for path in ("samples/blind/grid.png", "samples/class0/grid.png", "samples/completion/completion.png",
                 "data/shapes-tokens/manifest.json", "plots/vqgan_curves.png", "plots/gpt_curves.png"):
        assert (tmp_path / "demo" / path).is_file(), path
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") >= 6, again.stdout


def test_a_damaged_run_config_makes_the_stage_run_again_not_a_traceback(tmp_path):
    """demo.py decides which stages are finished from config.json: a list there (or a step that is no number)
    means "not finished", and the trainer then refuses the folder in its own one line."""
    import demo

    run = tmp_path / "run"
    run.mkdir()
    assert not demo.finished_run(run, 4)   # nothing yet: not finished, whatever the step asked for
    (run / "latest").write_text("step_00000004.pt")
    (run / "config.json").write_text(json.dumps({"stage": "gpt", "config": {"max_steps": 4}}))
    assert demo.finished_run(run, None)
    for damaged in ("[1, 2]", '{"config": {"max_steps": "four"}}', "{not json"):
        (run / "config.json").write_text(damaged)
        assert not demo.finished_run(run, None), damaged
