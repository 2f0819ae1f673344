"""Run-folder bookkeeping: metrics.jsonl across resumes and torn lines; checkpoint pruning after a resume."""
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
