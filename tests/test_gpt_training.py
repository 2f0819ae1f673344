"""train_gpt.py and sample.py: DDP, resume, binding to the VQGAN, vocabulary checks, sample outputs."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_state_dicts_equal, gpt_args, load, run_script
from vqgpt.checkpoint import latest_checkpoint
from vqgpt.runlog import read_metrics


@pytest.fixture(scope="module")
def gpt_run(shapes_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_ddp")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, out, 4, "--eval-every=4"), nproc=2)
    return out


def test_ddp_two_processes_end_with_identical_weights(gpt_run):
    state = load(latest_checkpoint(gpt_run))
    assert state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1
    evals = [r for r in read_metrics(gpt_run) if r["kind"] == "eval"]
    assert evals and 0 < evals[-1]["val_loss"] < 10
    grid = Image.open(gpt_run / "samples" / "samples_00000004.png")
    assert grid.size[0] > 100
    config = state["config"]
    assert config["n_classes"] == 6 and config["tokens_per_image"] == 64 and config["codebook_size"] == 256


def test_resume_reproduces_the_uninterrupted_run_exactly(shapes_tokens, tmp_path):
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "full", 6, "--sample-count=0"))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "split", 6, "--sample-count=0", "--stop-at-step=3"))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "split", 6, "--sample-count=0"))
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "split") and len(losses(tmp_path / "full")) == 6
    assert_state_dicts_equal(load(latest_checkpoint(tmp_path / "full"))["gpt"],
                             load(latest_checkpoint(tmp_path / "split"))["gpt"])
    assert "gpt_ema" not in load(latest_checkpoint(tmp_path / "full"))   # --ema-decay 0: no copy kept


@pytest.fixture(scope="module")
def ema_runs(shapes_tokens, tmp_path_factory):
    """Two ranks with --ema-decay 0.5: 4 steps straight, and 2 + 2 with a resume between."""
    root = tmp_path_factory.mktemp("gpt_ema")
    flags = ("--sample-count=0", "--ema-decay=0.5", "--batch-size=4")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "full", 4, *flags), nproc=2)
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "split", 4, *flags, "--stop-at-step=2"), nproc=2)
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "split", 4, *flags), nproc=2)
    return root / "full", root / "split"


def test_weight_ema_resumes_exactly_under_two_ranks(ema_runs):
    full, split = (load(latest_checkpoint(run)) for run in ema_runs)
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(ema_runs[0]) == losses(ema_runs[1]) and len(losses(ema_runs[0])) == 4
    assert_state_dicts_equal(full["gpt_ema"], split["gpt_ema"])
    assert_state_dicts_equal(full["gpt"], split["gpt"])
    assert full["world_size"] == 2 and len(set(full["rank_checksums"])) == 1   # the checksum covers the EMA
    assert any(not torch.equal(full["gpt_ema"][key], full["gpt"][key]) for key in full["gpt"])   # an average


def test_sampling_uses_the_weight_ema_unless_told_raw(ema_runs, tmp_path):
    state = load(latest_checkpoint(ema_runs[0]))
    state["gpt"] = state.pop("gpt_ema")   # a checkpoint whose trained weights are the EMA
    torch.save(state, tmp_path / "ema_as_raw.pt")

    def tokens(gpt, *flags):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        run_script("sample.py", f"--gpt={gpt}", "--n=4", "--class=1", f"--out={out}", "--save-tokens", *flags)
        return np.load(out / "tokens.npy")
    ema = tokens(ema_runs[0])
    assert np.array_equal(ema, tokens(tmp_path / "ema_as_raw.pt"))
    assert not np.array_equal(ema, tokens(ema_runs[0], "--weights=raw"))


def test_llama_block_trains_and_resumes_exactly_with_its_options(shapes_tokens, tmp_path):
    flags = ("--sample-count=0", "--arch=llama", "--n-kv-head=2", "--qk-norm", "--drop-path=0.2", "--token-dropout=0.05")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "full", 4, *flags))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "split", 4, *flags, "--stop-at-step=2"))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "split", 4, *flags))
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "split") and len(losses(tmp_path / "full")) == 4
    state = load(latest_checkpoint(tmp_path / "full"))
    assert "blocks.0.mlp.gate.weight" in state["gpt"] and state["config"]["arch"] == "llama"
    assert_state_dicts_equal(state["gpt"], load(latest_checkpoint(tmp_path / "split"))["gpt"])
    other_block = run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "split", 5, *flags[:1]), check=False)
    assert other_block.returncode == 2 and "arch: run has 'llama', you gave 'gpt2'" in other_block.stderr


def test_resume_applies_new_optimizer_settings_and_refuses_another_seed(shapes_tokens, tmp_path):
    run = tmp_path / "run"
    run_script("train_gpt.py", *gpt_args(shapes_tokens, run, 1, "--sample-count=0"))
    refused = run_script("train_gpt.py", *gpt_args(shapes_tokens, run, 2, "--sample-count=0", "--seed=3"), check=False)
    assert refused.returncode == 2 and "seed: run has 0, you gave 3" in refused.stderr
    run_script("train_gpt.py", *gpt_args(shapes_tokens, run, 2, "--sample-count=0", "--beta2=0.99",
                                          "--weight-decay=0.05"))
    state = load(latest_checkpoint(run))
    groups = state["optimizer"]["param_groups"]
    assert state["step"] == 2 and {tuple(g["betas"]) for g in groups} == {(0.9, 0.99)}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]   # decay on the matrices only


def test_refuses_a_vqgan_that_did_not_make_the_tokens(shapes_tokens, tiny_vqgan_run, tmp_path):
    import shutil

    other = tmp_path / "other.pt"
    state = torch.load(latest_checkpoint(tiny_vqgan_run), weights_only=True)
    state["vqgan"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["vqgan"].items()}
    torch.save(state, other)
    result = run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "run", 2, f"--vqgan={other}"), check=False)
    assert result.returncode == 2 and "is not the checkpoint that made" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    small = run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "run2", 2, "--codebook-size=128"), check=False)
    assert small.returncode == 2 and "--codebook-size is 128" in small.stderr
    images = run_script("train_gpt.py", *gpt_args(tiny_vqgan_run, tmp_path / "run3", 2), check=False)
    assert images.returncode == 2 and "manifest.json" in images.stderr
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_sample_blind_class_and_completion(gpt_run, shapes_shards, tmp_path):
    run_script("sample.py", f"--gpt={gpt_run}", "--n=4", f"--out={tmp_path / 'blind'}", "--top-k=50")
    assert sorted(p.name for p in (tmp_path / "blind").iterdir()) == [
        "grid.png", "sample_000.png", "sample_001.png", "sample_002.png", "sample_003.png"]
    assert Image.open(tmp_path / "blind" / "sample_000.png").size == (32, 32)
    run_script("sample.py", f"--gpt={gpt_run}", "--n=4", "--class=2", "--cfg=3", "--top-p=0.9",
               f"--out={tmp_path / 'cls'}")
    first = np.asarray(Image.open(tmp_path / "cls" / "grid.png"))
    run_script("sample.py", f"--gpt={gpt_run}", "--n=4", "--class=2", "--cfg=3", "--top-p=0.9",
               f"--out={tmp_path / 'cls2'}")
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "cls2" / "grid.png")))   # same seed, same images
    run_script("sample.py", f"--gpt={gpt_run}", "--n=3", f"--complete={shapes_shards}", "--keep-rows=4",
               f"--out={tmp_path / 'complete'}")
    grid = np.asarray(Image.open(tmp_path / "complete" / "completion.png"))
    assert grid.shape[0] > grid.shape[1] / 3    # three rows: originals, reconstructions, completions
    bad = run_script("sample.py", f"--gpt={gpt_run}", "--class=99", f"--out={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "outside [0, 6)" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_sample_saves_tokens_and_without_its_vqgan_samples_tokens_only(gpt_run, tmp_path):
    run_script("sample.py", f"--gpt={gpt_run}", "--n=3", "--class=1", f"--out={tmp_path / 'images'}", "--save-tokens")
    tokens = np.load(tmp_path / "images" / "tokens.npy")
    assert tokens.shape == (3, 64) and tokens.dtype == np.int64 and 0 <= tokens.min() and tokens.max() < 256
    state = load(latest_checkpoint(gpt_run))   # the same GPT, its tokens naming a VQGAN that is gone
    state["token_manifest"] = {**state["token_manifest"], "vqgan_checkpoint": str(tmp_path / "gone.pt")}
    torch.save(state, tmp_path / "orphan.pt")
    result = run_script("sample.py", f"--gpt={tmp_path / 'orphan.pt'}", "--n=3", "--class=1", f"--out={tmp_path / 'codes'}")
    assert len(result.stdout.strip().splitlines()) == 1 and "tokens only" in result.stdout and "--vqgan" in result.stdout
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["tokens.npy"]
    assert np.array_equal(np.load(tmp_path / "codes" / "tokens.npy"), tokens)   # same seed, same codes
    named = run_script("sample.py", f"--gpt={tmp_path / 'orphan.pt'}", f"--vqgan={tmp_path / 'gone.pt'}",
                       f"--out={tmp_path / 'x'}", check=False)   # a --vqgan given is a VQGAN asked for
    assert named.returncode == 2 and "is missing" in named.stderr


@pytest.mark.parametrize("flags, message", [(["--n=0"], "--num-samples (--n) must be"), (["--top-k=-1"], "--top-k must"),
                                            (["--top-p=2"], "--top-p must"), (["--temperature=-1"], "--temperature"),
                                            (["--cfg=3"], "give --class"),
                                            (["--keep-rows=2"], "--keep-rows applies to --complete only"),
                                            (["--complete=data", "--class=1"], "--class applies to new samples")])
def test_sample_refuses_bad_options_in_one_line(flags, message, tmp_path):
    result = run_script("sample.py", f"--gpt={tmp_path}", f"--out={tmp_path / 'out'}", *flags, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# no dropout of any kind: both ways of running draw nothing, so they see the same numbers; a global batch of 16
# is 8 a rank in 2 micro-steps of 4 on two ranks (grad accumulation under FSDP too) and 4 x 4 in one process
FSDP_FLAGS = ("--sample-count=0", "--dropout=0", "--label-dropout=0", "--global-batch-size=16", "--batch-size=4",
              "--ckpt-every=5", "--ema-decay=0.5")


def logged_losses(run, after: int = 0) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train" and r["step"] > after]


def assert_losses_close(a, b, count) -> None:
    assert [step for step, _ in a] == [step for step, _ in b] and len(a) == count
    assert np.allclose([loss for _, loss in a], [loss for _, loss in b], rtol=0, atol=1e-5), (a, b)


@pytest.fixture(scope="module")
def fsdp_runs(shapes_tokens, tmp_path_factory):
    """10 steps under DDP, under --fsdp (both on two ranks) and in one process, each checkpointed at step 5, with a
    weight EMA."""
    root = tmp_path_factory.mktemp("gpt_fsdp")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "ddp", 10, *FSDP_FLAGS), nproc=2)
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "fsdp", 10, *FSDP_FLAGS, "--fsdp"), nproc=2)
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "one", 10, *FSDP_FLAGS))
    return root


def test_fsdp_trains_like_ddp_and_saves_the_same_full_checkpoint(fsdp_runs):
    ddp, fsdp = fsdp_runs / "ddp", fsdp_runs / "fsdp"
    assert_losses_close(logged_losses(ddp), logged_losses(fsdp), 10)
    a, b = (load(latest_checkpoint(run)) for run in (ddp, fsdp))
    assert b["config"]["fsdp"] and b["world_size"] == 2 and len(b["rank_checksums"]) == 1
    evals = [[r for r in read_metrics(run) if r["kind"] == "eval"] for run in (ddp, fsdp)]
    assert len(evals[1]) == 1   # the EMA's and the trained weights' val loss, gathered to rank 0 under FSDP
    for key in ("val_loss", "val_loss_raw"):
        assert abs(evals[0][0][key] - evals[1][0][key]) < 1e-5, key
    assert evals[1][0]["val_loss"] != evals[1][0]["val_loss_raw"]
    assert_close_states(a, b)
    for group_a, group_b in zip(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]):
        assert group_a["params"] == group_b["params"]   # the same ids for the same parameters
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][index].keys()
        for name, value in state.items():
            assert torch.allclose(value, b["optimizer"]["state"][index][name], atol=1e-5), (index, name)


def assert_close_states(a: dict, b: dict) -> None:
    """The same networks (the trained weights and their EMA) within 1e-5, key for key."""
    for network in ("gpt", "gpt_ema"):
        assert a[network].keys() == b[network].keys()   # the tied head too, as state_dict() has it
        for key in a[network]:
            assert torch.allclose(a[network][key], b[network][key], atol=1e-5), (network, key)
    assert any(not torch.equal(b["gpt_ema"][key], b["gpt"][key]) for key in b["gpt"])   # an average


def test_fsdp_checkpoint_resumes_in_one_process_and_ddp_checkpoint_under_fsdp(fsdp_runs, shapes_tokens):
    root = fsdp_runs
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "fsdp_then_one", 10, *FSDP_FLAGS,
                                          f"--resume={root / 'fsdp' / 'step_00000005.pt'}"))
    assert_losses_close(logged_losses(root / "fsdp_then_one"), logged_losses(root / "one", after=5), 5)
    assert_close_states(load(latest_checkpoint(root / "fsdp_then_one")), load(latest_checkpoint(root / "one")))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, root / "ddp_then_fsdp", 10, *FSDP_FLAGS, "--fsdp",
                                          f"--resume={root / 'ddp' / 'step_00000005.pt'}"), nproc=2)
    assert_losses_close(logged_losses(root / "ddp_then_fsdp"), logged_losses(root / "ddp", after=5), 5)
    assert_close_states(load(latest_checkpoint(root / "ddp_then_fsdp")), load(latest_checkpoint(root / "ddp")))


def test_fsdp_refuses_compile_in_one_line(shapes_tokens, tmp_path):
    result = run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "run", 2, "--fsdp", "--compile"),
                        check=False)
    assert result.returncode == 2 and "--fsdp does not combine with --compile" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


SHARDED_SAVE = """
import dataclasses
import sys
import torch
from vqgpt import distributed
from vqgpt.errors import RunError
from vqgpt.fsdp import FullStateModel
from vqgpt.training import TrainingRun

dist = distributed.setup("cpu")

@dataclasses.dataclass(frozen=True)
class Settings:
    out: str = sys.argv[1]
    keep_last: int = 2
    keep_every: int = 0


cfg = Settings()
run = TrainingRun(cfg, dist, "gpt", ())
run.track({"gpt": FullStateModel(torch.nn.Linear(2, 2))})
for step, value in ((1, 1.0), (2, float("nan"))):
    gathered = {"gpt": {"w": torch.tensor([value, 2.0])}} if dist.is_main else {}   # what rank 0 alone holds
    try:
        run.save(step, gathered, {})
        print(f"rank {dist.rank} saved {step}")
    except RunError as err:
        print(f"rank {dist.rank} refused {step}: {err}")
distributed.cleanup()
"""


def test_sharded_save_checks_the_gathered_state_and_every_rank_takes_rank_0s_verdict(tmp_path):
    script = tmp_path / "sharded_save.py"
    script.write_text(SHARDED_SAVE)
    (tmp_path / "run").mkdir()
    result = run_script(str(script), str(tmp_path / "run"), nproc=2, timeout=120)
    for rank in (0, 1):
        assert f"rank {rank} saved 1" in result.stdout and f"rank {rank} refused 2: weights became non-finite" in result.stdout
    state = load(tmp_path / "run" / "step_00000001.pt")
    assert len(state["rank_checksums"]) == 1 and torch.equal(state["gpt"]["w"], torch.tensor([1.0, 2.0]))
    assert latest_checkpoint(tmp_path / "run").name == "step_00000001.pt"


def test_fsdp_trains_the_llama_block_under_bf16_and_evals_repeatedly_on_gathered_copies(shapes_tokens, tmp_path):
    from models.gpt import GPT, GPTConfig
    from vqgpt.config import subconfig
    from vqgpt.settings import GPTTrainConfig

    flags = ("--fsdp", "--arch=llama", "--precision=bf16", "--eval-every=2", "--batch-size=4", "--ema-decay=0.5")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path, 3, *flags), nproc=2)
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all(0 < r["val_loss"] < 10 for r in evals)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["samples_00000002.png", "samples_00000003.png"]
    state = load(latest_checkpoint(tmp_path))
    plain = GPT(subconfig(GPTConfig, GPTTrainConfig(**{k: v for k, v in state["config"].items()
                                                        if k in GPTTrainConfig.__dataclass_fields__})))
    assert state["gpt"].keys() == state["gpt_ema"].keys() == plain.state_dict().keys()   # untied head, no rotations
