"""Run-folder bookkeeping: metrics.jsonl across resumes and torn lines; checkpoint pruning after a resume."""
import pytest

from vqgpt.runlog import METRICS_NAME, RunLog, read_metrics


def test_resume_drops_later_records_and_survives_a_torn_line(tmp_path):
    log = RunLog(tmp_path, True, total_steps=30, start_step=0, description="t")
    for step in (10, 20, 30):
        log.log(step, "train", {"loss": float(step)})
    log.close()
    with open(tmp_path / METRICS_NAME, "a") as handle:
        handle.write('{"step": 31, "kind": "tr')   # killed mid-append
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]

    resumed = RunLog(tmp_path, True, total_steps=30, start_step=20, description="t")
    resumed.log(30, "train", {"loss": 0.5})
    resumed.close()
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(10, 10.0), (20, 20.0), (30, 0.5)]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path, False, total_steps=5, start_step=0, description="t")
    log.log(1, "train", {"loss": 1.0})
    log.close()
    assert not (tmp_path / METRICS_NAME).exists()


def test_saving_after_resuming_an_older_checkpoint_keeps_it(tmp_path):
    from vqgpt.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030.pt"]
    save_checkpoint(tmp_path, 15, {"step": 15}, keep_last=1)   # a run resumed from an earlier checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000015.pt"
    assert (tmp_path / "step_00000015.pt").is_file()


def test_progress_in_a_log_file_is_whole_lines(capsys):
    from vqgpt.runlog import PlainProgress, progress

    assert isinstance(progress("auto", total=4), PlainProgress)   # captured stderr is no terminal
    with progress("auto", range(20), desc="work", unit="img", every=5) as bar:
        for _ in bar:
            pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"work: {n}/20 img" for n in (5, 10, 15, 20)]
    assert progress("false", total=4).disable and progress("auto", total=4, enabled=False).disable
    bar = progress("true", total=4)   # a bar on request, carriage returns and all
    bar.update(4)
    bar.close()
    assert "\r" in capsys.readouterr().err


def test_a_trainer_in_a_log_file_prints_a_line_every_log_every_steps(shapes_shards, tmp_path):
    from tests.helpers import run_script, vqgan_args

    result = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "run", 4, "--log-every=2"))
    steps = [line.split(" (")[0] for line in result.stderr.splitlines() if line.startswith("vqgan: ")]
    assert steps == ["vqgan: 2/4 step", "vqgan: 4/4 step"] and "\r" not in result.stdout + result.stderr
    bar = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "bar", 1, "--progress=true"))
    assert "\r" in bar.stderr


def test_the_bar_reads_device_values_only_on_the_steps_it_shows(tmp_path, capsys):
    reads = []

    class DeviceValue:   # what a CUDA loss tensor costs: .item() waits for the device
        def item(self):
            reads.append(1)
            return 0.5

    log = RunLog(tmp_path, True, total_steps=10, start_step=0, description="t", progress_mode="auto", every=5)
    for _ in range(10):
        log.advance({"l1": DeviceValue()})
    log.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("t: ")]
    assert len(reads) == 2 and len(lines) == 2 and all(line.endswith("l1=0.5") for line in lines)


def tensorboard_scalars(run_dir) -> dict[str, list[int]]:
    """Every scalar tag in RUN/tensorboard/ with the steps it was written at."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_training_run_writes_its_scalars_to_tensorboard(shapes_shards, tmp_path):
    from tests.helpers import run_script, vqgan_args

    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "run", 2))   # and an eval at the end
    scalars = tensorboard_scalars(tmp_path / "run")
    logged = {f"{record['kind']}/{key}" for record in read_metrics(tmp_path / "run") for key, value in record.items()
              if isinstance(value, (int, float)) and key != "step"}
    assert {"train/l1", "train/lr", "train/grad_norm", "eval/psnr", "eval/codebook_usage"} <= logged
    assert set(scalars) == logged
    assert scalars["train/l1"] == [1, 2] and scalars["eval/psnr"] == [2]


class FakeWandbRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_tensorboard_scalars_the_config_and_one_run_across_a_resume(tmp_path, monkeypatch):
    import json
    import sys
    import types

    runs = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **init: runs.append(
        FakeWandbRun(**init)) or runs[-1]))
    (tmp_path / "config.json").write_text(json.dumps({"stage": "gpt", "config": {"lr": 0.1}, "world_size": 2}))
    log = RunLog(tmp_path, True, total_steps=4, start_step=0, description="t", progress_mode="false",
                 wandb_project="proj")
    log.log(2, "train", {"loss": 1.5, "lr": 0.1, "note": "text"})
    log.log(2, "eval", {"val_loss": 2.5})
    log.close()
    resumed = RunLog(tmp_path, True, total_steps=4, start_step=2, description="t", progress_mode="false",
                     wandb_project="proj")
    resumed.close()
    RunLog(tmp_path, False, total_steps=4, start_step=2, description="t", wandb_project="proj").close()   # rank 1

    assert len(runs) == 2 and all(run.finished for run in runs)
    first, second = (run.init for run in runs)
    assert first["project"] == "proj" and first["config"]["config"] == {"lr": 0.1} and first["config"]["world_size"] == 2
    assert first["id"] == second["id"] and second["resume"] == "allow" and first["dir"] == str(tmp_path)
    assert runs[0].logged == [(2, {"train/loss": 1.5, "train/lr": 0.1}), (2, {"eval/val_loss": 2.5})]
    assert set(tensorboard_scalars(tmp_path)) == {"train/loss", "train/lr", "eval/val_loss"}


@pytest.mark.parametrize("script", ["train_resnet_vqgan.py", "train_gpt.py"])
def test_wandb_without_the_package_is_one_line_naming_pip_install(script, tmp_path, monkeypatch, capsys):
    import importlib
    import sys

    from vqgpt.config import parse_config
    from vqgpt.errors import exit_on_user_error
    from vqgpt.settings import GPT_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GPTTrainConfig, VQGANTrainConfig

    monkeypatch.setitem(sys.modules, "wandb", None)   # what an environment without it shows find_spec
    module = importlib.import_module(script.removesuffix(".py"))
    cls, presets, data = ((VQGANTrainConfig, VQGAN_TRAIN_PRESETS, "--data") if script.startswith("train_resnet")
                          else (GPTTrainConfig, GPT_TRAIN_PRESETS, "--tokens"))
    cfg = parse_config(cls, presets, [f"{data}={tmp_path / 'missing'}", f"--out={tmp_path / 'run'}", "--wandb=proj"])
    assert exit_on_user_error(lambda: module.main(cfg), script) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install wandb" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_training_run_logs_to_wandb_offline(shapes_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (requirements-dev.txt)")
    from tests.helpers import run_script, vqgan_args

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "run", 2, "--wandb=vqgpt-test"))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    [run_file] = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = run_file.read_bytes()   # protobuf records: the names and config keys appear as plain bytes
    assert all(tag.encode() in data for tag in tensorboard_scalars(tmp_path / "run"))
    assert b"lpips_backbone" in data and b"vqgpt-test" in data
