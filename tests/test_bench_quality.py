"""bench/quality.py reuses a finished run only when it was trained as the bench would train it now."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.quality import parse_args, reusable, run_folder, vqgan_command
from vqgpt.config import VQGAN_TRAIN_PRESETS, VQGANTrainConfig, config_to_dict, parse_config

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
    del config["chroma_gain"]        # 1.0 now: the run predates the option, so it trained without it
    save_config(run, config)
    assert reusable(run, command_for(run), BUDGET.steps)
    with pytest.raises(SystemExit, match="chroma_gain"):
        reusable(run, command_for(run, flags=("--chroma-gain", "2.3")), BUDGET.steps)


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
