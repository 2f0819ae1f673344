"""The VQGAN trainer: loss functions, gradient flow, DDP, multi-node, resume, preemption, bad input."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import (ROOT, assert_state_dicts_equal, free_port, load, run_script, script_env, tiny_models,
                           vqgan_args)
from vqgpt.checkpoint import latest_checkpoint, list_checkpoints
from vqgpt.settings import VQGANTrainConfig
from vqgpt.losses import adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from vqgpt.runlog import read_metrics
from vqgpt.training import TrainingRun
from vqgpt.distributed import DistInfo
from vqgpt.errors import RunError
from vqgpt.vqgan_step import discriminator_backward, generator_backward


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 3.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6 ; relu(1 + fake) = [0, 1, 4] -> mean 5/3
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 5 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(-1 / 3)


def test_reconstruction_loss_by_hand():
    images, recon = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]])
    loss, terms = reconstruction_loss(images, recon, None, l1_weight=2.0, perceptual_weight=1.0, l2_weight=3.0)
    # |error| = 0.5, 2 -> mean 1.25; error^2 = 0.25, 4 -> mean 2.125; no perceptual network, no LPIPS term
    assert loss.item() == pytest.approx(2 * 1.25 + 3 * 2.125)
    assert terms["l1"].item() == 1.25 and terms["mse"].item() == 2.125 and "lpips" not in terms
    assert "mse" not in reconstruction_loss(images, recon, None, 1.0, 0.0)[1]   # off by default


def test_chroma_weight_scales_only_the_colour_part_of_the_error():
    images = torch.zeros(1, 3, 1, 1)
    # one pixel's error (0.6, 0.0, 0.0): grey part 0.2 on each channel, chroma part (0.4, -0.2, -0.2)
    recon = torch.tensor([-0.6, 0.0, 0.0]).view(1, 3, 1, 1)
    plain = reconstruction_loss(images, recon, None, 0.0, 0.0, l2_weight=1.0)[0].item()
    weighted = reconstruction_loss(images, recon, None, 0.0, 0.0, l2_weight=1.0, chroma_weight=4.0)[0].item()
    grey_share, chroma_share = 3 * 0.2 ** 2 / 3, (0.4 ** 2 + 2 * 0.2 ** 2) / 3
    assert plain == pytest.approx(grey_share + chroma_share)
    assert weighted == pytest.approx(grey_share + 4 * chroma_share)
    grey_error = torch.full((1, 3, 1, 1), -0.5)   # the same error on every channel has no colour part
    assert reconstruction_loss(images, grey_error, None, 1.0, 0.0, 1.0, chroma_weight=4.0)[0].item() == \
        pytest.approx(reconstruction_loss(images, grey_error, None, 1.0, 0.0, 1.0)[0].item())


def test_logged_errors_are_the_plain_ones_whatever_the_chroma_weight():
    images = torch.zeros(1, 3, 1, 1)
    recon = torch.tensor([-0.6, 0.0, 0.0]).view(1, 3, 1, 1)   # |error| (0.6, 0, 0): L1 0.2, squared error 0.12
    for weight in (1.0, 2.0, 4.0):
        terms = reconstruction_loss(images, recon, None, 1.0, 0.0, l2_weight=1.0, chroma_weight=weight)[1]
        assert terms["l1"].item() == pytest.approx(0.2) and terms["mse"].item() == pytest.approx(0.12)


def test_adaptive_weight_by_hand_and_safe_in_half_precision():
    grad_rec = torch.tensor([3.0, 4.0])     # norm 5
    grad_gan = torch.tensor([0.0, 2.0])     # norm 2
    assert adaptive_weight(grad_rec, grad_gan, eps=0.0).item() == pytest.approx(2.5)
    assert adaptive_weight(grad_rec, torch.zeros(2), max_weight=1e4).item() == pytest.approx(1e4)
    big = torch.full((10000,), 300.0, dtype=torch.float16)   # squared sum overflows fp16
    weight = adaptive_weight(big, big)
    assert torch.isfinite(weight) and weight.item() == pytest.approx(1.0, rel=1e-3)


def test_discriminator_loss_gives_the_vqgan_no_gradient():
    models = tiny_models()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = VQGANTrainConfig(perceptual_weight=0.0)
    recon, _ = generator_backward(models, images, cfg, gan_active=True, loss_scale=1.0, dtype=torch.float32)
    models.vqgan.zero_grad(set_to_none=True)
    models.discriminator.zero_grad(set_to_none=True)
    discriminator_backward(models, images, recon, 1.0, torch.float32)
    assert all(p.grad is None for p in models.vqgan.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models.discriminator.parameters())


def test_after_the_optimizer_step_restarted_codes_start_with_fresh_moments():
    from vqgpt.vqgan_step import after_optimizer_step

    models = tiny_models()
    vqgan = models.raw_vqgan
    vqgan.quantizer.dead_code_steps = 1
    codebook = vqgan.quantizer.codebook
    optimizer = torch.optim.Adam([codebook], lr=1e-3)
    codebook.grad = torch.ones_like(codebook)   # moments in every row, as a long run leaves them
    optimizer.step()
    state = optimizer.state[codebook]
    vqgan(torch.rand(2, 3, 32, 32) * 2 - 1)   # uses some codes: the others are restarted
    before = codebook.detach().clone()
    assert after_optimizer_step(vqgan, optimizer, skipped=False) > 0
    restarted = (codebook != before).any(dim=1)
    assert restarted.any() and not restarted.all()
    for moment in (state["exp_avg"], state["exp_avg_sq"]):
        assert (moment[restarted] == 0).all() and (moment[~restarted] != 0).all()


def test_generator_step_matches_the_textbook_formulation():
    """One forward + gradients w.r.t. the reconstruction == taming's loss.backward() with autograd.grad lambda."""
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = VQGANTrainConfig(perceptual_weight=0.0)
    models = tiny_models()
    generator_backward(models, images, cfg, gan_active=True, loss_scale=1.0, dtype=torch.float32)
    fast = {n: p.grad.clone() for n, p in models.vqgan.named_parameters() if p.grad is not None}

    reference = tiny_models()
    recon, quant_loss, _, _ = reference.vqgan(images)
    rec_loss = (images - recon).abs().mean()
    g_loss = -reference.discriminator(recon).mean()
    last = reference.vqgan.last_layer
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    weight = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * 0.8
    (rec_loss + quant_loss + weight * g_loss).backward()
    slow = {n: p.grad for n, p in reference.vqgan.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys() and len(fast) == len(list(models.vqgan.parameters()))
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def train_losses(run_dir):
    return [(r["step"], r["l1"], r.get("d_loss")) for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def ddp_run(shapes_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqgan_ddp")
    # accumulation (no_sync micro-steps), a dead-code restart every step and Muon, all kept in sync across ranks
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, out, 4, "--ckpt-every=2", "--eval-every=4",
                                                    "--grad-accum=2", "--dead-code-steps=1", "--optimizer=muon"),
               nproc=2)
    return out


def test_ddp_two_processes_end_with_identical_weights(ddp_run):
    state = load(latest_checkpoint(ddp_run))
    assert state["step"] == 4 and state["world_size"] == 2
    assert len(state["rank_checksums"]) == 2 and len(set(state["rank_checksums"])) == 1
    assert [group["muon"] for group in state["opt_g"]["param_groups"]] == [True, False]
    restarts = [r["codes_restarted"] for r in read_metrics(ddp_run) if r["kind"] == "train"]
    assert sum(restarts) > 0 and all(float(count).is_integer() for count in restarts)   # a count, not a mean
    assert state["loader"]["cursor"] == 4 * 2 * 2 * 4   # steps x micro-steps x ranks x batch
    config = json.loads((ddp_run / "config.json").read_text())
    assert config["lpips_backbone"] == "random" and config["config"]["lpips_random_backbone"] is True
    evals = [r for r in read_metrics(ddp_run) if r["kind"] == "eval"]
    assert evals and evals[-1]["val_images"] == 100 and 0 < evals[-1]["codebook_usage"] <= 1
    assert (ddp_run / "samples" / "recon_00000004.png").is_file()


def test_resume_with_another_world_size_continues(ddp_run, shapes_shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ddp_run, out)
    (out / "latest").write_text("step_00000002.pt\n")
    (out / "step_00000004.pt").unlink()
    result = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, out, 4, "--batch-size=16",
                                                             "--grad-accum=1", "--dead-code-steps=1",
                                                             "--optimizer=muon"))
    assert "resumed from" in result.stdout + result.stderr
    state = load(latest_checkpoint(out))
    assert state["step"] == 4 and state["world_size"] == 1
    assert state["loader"]["cursor"] == 4 * 16   # the same global samples the 2-rank run consumed


def two_nodes(shapes_shards, outs, steps: int, *extra: str) -> tuple[list[int], list[str]]:
    """Two one-rank torchrun nodes rendezvousing on localhost, node k training into outs[k]."""
    port = free_port()
    commands = []
    for node_rank in (0, 1):
        commands.append([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                         "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                         "--rdzv-id=vqgan-test", "train_resnet_vqgan.py",
                         *vqgan_args(shapes_shards, outs[node_rank], steps, *extra)])
    processes = [subprocess.Popen(c, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for c in commands]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    return [p.returncode for p in processes], outputs


def test_two_node_rendezvous_on_localhost(shapes_shards, tmp_path):
    codes, outputs = two_nodes(shapes_shards, [tmp_path / "run"] * 2, 2, "--dead-code-steps=1")
    assert codes == [0, 0], outputs
    state = load(latest_checkpoint(tmp_path / "run"))
    assert state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1


def test_ranks_that_see_other_run_folders_or_checkpoints_stop_together(shapes_shards, tmp_path):
    # what a filesystem that is not shared (or shows nodes stale files) looks like: each node its own --out.
    # Every rank exits 2 with the line rank 0 prints; torchrun reports failed workers with its own status 1
    first, second = tmp_path / "node0", tmp_path / "node1"
    codes, outputs = two_nodes(shapes_shards, [first, second], 1)
    assert codes == [1, 1] and "rank(s) [1] do not see the run folder rank 0 writes" in outputs[0], outputs
    assert not list_checkpoints(first) and not list_checkpoints(second)   # neither trained
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, first, 2, "--ckpt-every=1"))
    shutil.copytree(first, second, dirs_exist_ok=True)
    shutil.copy(first / "step_00000001.pt", second / "step_00000002.pt")   # node 1's view is a step behind
    codes, outputs = two_nodes(shapes_shards, [first, second], 3)
    assert codes == [1, 1] and "rank(s) [1] see another step_00000002.pt than rank 0" in outputs[0], outputs
    assert load(latest_checkpoint(first))["step"] == 2


@pytest.mark.parametrize("total, ranks, most, expected", [(8, 2, 4, (4, 1)), (8, 1, 4, (4, 2)), (12, 2, 4, (3, 2)),
                                                          (7, 1, 4, (1, 7)), (16, 4, 8, (4, 1))])
def test_the_global_batch_splits_into_the_fewest_micro_steps(total, ranks, most, expected):
    from vqgpt.distributed import split_global_batch

    cfg = split_global_batch(VQGANTrainConfig(data="d", global_batch_size=total, batch_size=most), ranks)
    assert (cfg.batch_size, cfg.grad_accum) == expected and cfg.batch_size * cfg.grad_accum * ranks == total
    with pytest.raises(RunError, match="does not split over 3 ranks"):
        split_global_batch(VQGANTrainConfig(data="d", global_batch_size=8), 3)
    prime = 1_000_000_000_039   # the divisor search takes its square root's trials, not 10**12
    cfg = split_global_batch(VQGANTrainConfig(data="d", global_batch_size=prime, batch_size=4), 1)
    assert (cfg.batch_size, cfg.grad_accum) == (1, prime)


def test_a_global_batch_is_kept_on_another_world_size(shapes_shards, tmp_path):
    flags = ("--global-batch-size=8", "--ckpt-every=1", "--keep-last=5")
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "two", 2, *flags), nproc=2)
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "one", 2, *flags))
    two, one = load(tmp_path / "two" / "step_00000002.pt"), load(tmp_path / "one" / "step_00000002.pt")
    assert (two["config"]["batch_size"], two["config"]["grad_accum"]) == (4, 1)
    assert (one["config"]["batch_size"], one["config"]["grad_accum"]) == (4, 2)
    for key, value in one["vqgan"].items():   # the same 8 images a step: the same steps, but for summation order
        if value.is_floating_point():
            torch.testing.assert_close(two["vqgan"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "two", 3, *flags))   # now one rank
    resumed = load(tmp_path / "two" / "step_00000003.pt")
    assert resumed["world_size"] == 1 and (resumed["config"]["batch_size"], resumed["config"]["grad_accum"]) == (4, 2)
    assert resumed["loader"]["cursor"] == 3 * 8


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_resume_reproduces_the_uninterrupted_run_exactly(shapes_shards, tmp_path, optimizer):
    flags = ("--eval-every=3", f"--optimizer={optimizer}")
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "full", 6, *flags))
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 6, *flags, "--stop-at-step=3"))
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 6, *flags))
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")
    assert any(d is not None for _, _, d in train_losses(tmp_path / "full"))   # the GAN phase was covered
    full, split = load(latest_checkpoint(tmp_path / "full")), load(latest_checkpoint(tmp_path / "split"))
    assert len(full["opt_g"]["param_groups"]) == (2 if optimizer == "muon" else 1)
    for key in ("vqgan", "discriminator"):
        assert_state_dicts_equal(full[key], split[key])


def test_sigterm_saves_a_checkpoint_that_resumes(shapes_shards, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train_resnet_vqgan.py", *vqgan_args(shapes_shards, out, 10000, "--ckpt-every=100000")]
    process = subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    saved = latest_checkpoint(out)
    assert saved is not None and "stop requested" in output
    step = load(saved)["step"]
    assert 2 <= step < 10000
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, out, step + 2))
    assert load(latest_checkpoint(out))["step"] == step + 2


def expect_exit_2(*args, contains: str):
    result = run_script("train_resnet_vqgan.py", *args, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and contains in lines[0], result.stderr
    return result


def test_bad_inputs_exit_2_with_one_line(shapes_shards, tmp_path):
    expect_exit_2(*vqgan_args(tmp_path / "missing", tmp_path / "r1", 2), contains="no such shard folder")
    (tmp_path / "empty").mkdir()
    expect_exit_2(*vqgan_args(tmp_path / "empty", tmp_path / "r2", 2), contains="manifest.json: missing")
    expect_exit_2(*vqgan_args(shapes_shards, tmp_path / "r3", 2, "--image-size=64"),
                  contains="the levels' grids are [64, 32, 16]; pass --attn-resolutions 16")
    expect_exit_2(*vqgan_args(shapes_shards, tmp_path / "r3", 2, "--image-size=64", "--attn-resolutions=16"),
                  contains="images are 32x32")

    run_dir = tmp_path / "r4"
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 2, "--ckpt-every=1"))
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 4, "--codebook-size=128"), contains="incompatible config")
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 4, "--resume=none"), contains="already holds checkpoints")
    newest = latest_checkpoint(run_dir)
    newest.write_bytes(b"\x00garbage")
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 4), contains="not a readable checkpoint")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000001.pt", "step_00000002.pt"]


def test_resume_refuses_another_optimizer_and_takes_older_runs_as_adam(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 2))
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--optimizer=muon"),
                  contains="optimizer: run has 'adam', you gave 'muon'")
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--permute-channels"),
                  contains="permute_channels: run has False, you gave True")
    # a run from before --optimizer existed has no such key: it trained with Adam, and resumes on it
    newest = latest_checkpoint(run_dir)
    state = load(newest)
    del state["config"]["optimizer"]
    torch.save(state, newest)
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--optimizer=muon"),
                  contains="optimizer: run has 'adam', you gave 'muon'")
    # seed and flips draw the data order an exact resume replays
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--seed=1"), contains="seed: run has 0, you gave 1")
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--flip=false"), contains="flip: run has True, you gave False")
    # the share of permuted images means nothing to a run that keeps RGB order (a flag for it is refused at once)
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--permuted-share=0.5"),
                  contains="--permuted-share applies with --permute-channels true only")
    state = load(newest)
    state["config"]["permuted_share"] = 0.5   # as an RGB run made from a preset with another share records it
    torch.save(state, newest)
    result = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 3))
    assert "resumed from" in result.stdout + result.stderr
    assert load(latest_checkpoint(run_dir))["step"] == 3


def test_resume_runs_with_the_optimizer_settings_config_json_records(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 1, "--optimizer=muon"))
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 2, "--optimizer=muon",
                                                    "--adam-betas=0.8,0.99", "--muon-lr-scale=2"))
    state = load(latest_checkpoint(run_dir))
    assert state["step"] == 2 and state["config"]["adam_betas"] == [0.8, 0.99]
    for name in ("opt_g", "opt_d"):   # the groups the step ran with, not the first run's (0.5, 0.9) and 3.0
        assert {tuple(group["betas"]) for group in state[name]["param_groups"]} == {(0.8, 0.99)}
    assert {group["muon_lr_scale"] for group in state["opt_g"]["param_groups"]} == {2.0}


def test_resume_of_a_permuting_run_refuses_another_share(shapes_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, run_dir, 2, "--permute-channels"))
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3, "--permute-channels", "--permuted-share=0.5"),
                  contains="permuted_share: run has 0.8333333333333334, you gave 0.5")
    expect_exit_2(*vqgan_args(shapes_shards, run_dir, 3), contains="permute_channels: run has True, you gave False")


def test_missing_lpips_weights_stop_before_training(shapes_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    flags = [f for f in vqgan_args(shapes_shards, tmp_path / "run", 2) if "random-backbone" not in f]
    import os
    result = subprocess.run([sys.executable, "train_resnet_vqgan.py", *flags], cwd=ROOT, capture_output=True, text=True,
                            env={**script_env(), "TORCH_HOME": os.environ["TORCH_HOME"]}, timeout=120)
    assert result.returncode == 2
    assert "vgg16-397923af.pth" in result.stderr and str(tmp_path / "empty_hub") in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_nan_steps_are_skipped_then_stop(tmp_path):
    cfg = SimpleNamespace(out=str(tmp_path), max_bad_steps=3, resume="auto", keep_last=2, seed=0)
    run = TrainingRun(cfg, DistInfo(0, 0, 1, torch.device("cpu"), True), "vqgan", ())
    assert run.end_of_step_consensus(False) == (False, True)
    assert run.end_of_step_consensus(True) == (False, False)
    assert run.end_of_step_consensus(False) == (False, True)
    assert run.end_of_step_consensus(False) == (False, True)
    with pytest.raises(RunError, match="3 non-finite steps in a row"):
        run.end_of_step_consensus(False)
    assert run.skipped_steps == 4
    with pytest.raises(RunError, match="non-finite"):
        run.save(5, {"model": {"w": torch.tensor([1.0, float("nan")])}}, {})
    assert latest_checkpoint(tmp_path) is None


def test_a_run_whose_every_step_was_skipped_does_not_end_as_a_success(tmp_path):
    cfg = SimpleNamespace(out=str(tmp_path), max_bad_steps=10, resume="auto", keep_last=2, seed=0)
    closable = SimpleNamespace(close=lambda: None)
    run = TrainingRun(cfg, DistInfo(0, 0, 1, torch.device("cpu"), True), "vqgan", ())
    for _ in range(3):
        run.end_of_step_consensus(False)
    with pytest.raises(RunError, match="all 3 steps of this run were non-finite"):
        run.finish(closable, closable)
    run.end_of_step_consensus(True)   # one step that counted: the run did learn
    assert run.finish(closable, closable) == 0


def test_help_lists_every_setting():
    result = run_script("train_resnet_vqgan.py", "--help")
    for flag in ("--max-steps", "--disc-start", "--lpips-weights", "--codebook-dim", "--dead-code-steps", "--preset"):
        assert flag in result.stdout
    bad = run_script("train_resnet_vqgan.py", "--max-stepz=3", check=False)
    assert bad.returncode == 2 and "valid settings" in bad.stderr and "--max-steps" in bad.stderr


def test_vqgan_weight_ema_resumes_exactly_and_binds_the_tokens_it_makes(shapes_shards, tmp_path):
    from vqgpt.shards import read_manifest
    from vqgpt.trained_models import load_bound_vqgan

    flags = ("--ema-decay=0.5", "--batch-size=2")
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "full", 3, *flags))
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 3, *flags, "--stop-at-step=2"))
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 3, *flags))
    full, split = (load(latest_checkpoint(tmp_path / run)) for run in ("full", "split"))
    assert_state_dicts_equal(full["vqgan_ema"], split["vqgan_ema"])
    assert_state_dicts_equal(full["vqgan"], split["vqgan"])
    assert any(not torch.equal(full["vqgan_ema"][k], full["vqgan"][k]) for k in full["vqgan"])
    tokens = tmp_path / "tokens"
    run_script("image_quantizer.py", f"--vqgan={tmp_path / 'full'}", f"--data={shapes_shards}", f"--out={tokens}",
               "--batch-size=128", "--progress=false")
    manifest = read_manifest(tokens)
    assert manifest["vqgan_weights"] == "ema" and load_bound_vqgan(manifest).weights == "ema"
    run_script("export.py", str(tmp_path / "full"), f"--out={tmp_path / 'raw'}", "--weights=raw")
    with pytest.raises(RunError, match="made with its ema weights"):   # the same checkpoint, the other weights
        load_bound_vqgan(manifest, str(tmp_path / "raw"))
    run_script("export.py", str(tmp_path / "full"), f"--out={tmp_path / 'ema'}")
    assert load_bound_vqgan(manifest, str(tmp_path / "ema")).weights == "ema"
