"""bf16, fp16 (with its gradient scalers), torch.compile and channels_last on CPU; TF32 flags; the step fixes."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from models.discriminator import NLayerDiscriminator
from models.quantizer import VectorQuantizer, full_fp32_matmul
from models.vqgan import VQGAN, VQGAN_PRESETS
from tests.helpers import (gpt_args, load, run_script, spy_vqgan_memory_format, tiny_models, train_records,
                           vqgan_args)
from vqgpt.checkpoint import latest_checkpoint
from vqgpt.settings import VQGAN_TRAIN_PRESETS, VQGANTrainConfig
from vqgpt.errors import RunError
from vqgpt.images import to_unit_range
from vqgpt.shards import ShardSplit
from vqgpt.training import configure_backends, grad_scaler, parameters_checksum, resolve_precision
from vqgpt.vqgan_step import VQGANModels, evaluate, generator_backward

LOSS_CFG = VQGANTrainConfig(perceptual_weight=0.0)   # the trainer's loss weights without LPIPS


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_parameters_checksum_ignores_the_memory_format():
    torch.manual_seed(0)
    convs = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3))
    plain = {"net": {**convs.state_dict(), "scalar": torch.tensor(2.0), "half": torch.ones(3, dtype=torch.bfloat16)}}
    convs.to(memory_format=torch.channels_last)   # a 1x1 kernel: is_contiguous() yet stride(-1) == 8
    assert convs[0].weight.stride(-1) != 1
    channels_last = {"net": {**convs.state_dict(), "scalar": torch.tensor(2.0),
                             "half": torch.ones(3, dtype=torch.bfloat16)}}
    assert parameters_checksum(channels_last) == parameters_checksum(plain)
    plain["net"]["scalar"] = torch.tensor(3.0)
    assert parameters_checksum(channels_last) != parameters_checksum(plain)


@pytest.fixture
def saved_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_both_tf32_getters_work_after_configure_backends_and_in_the_fp32_lookup(saved_backend_flags):
    configure_backends(torch.device("cuda"))   # only sets flags: runs without a GPU
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    seen = {}
    quantizer = VectorQuantizer(VQGAN_PRESETS["tiny"])
    original = torch.Tensor.__matmul__

    def spy(tensor, other):   # the distance product inside nearest_codes' IEEE region
        seen.update(allow_tf32=torch.backends.cuda.matmul.allow_tf32, precision=torch.get_float32_matmul_precision())
        return original(tensor, other)

    torch.Tensor.__matmul__ = spy
    try:
        with full_fp32_matmul():
            assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.get_float32_matmul_precision() == "highest"
        quantizer.nearest_codes(torch.randn(5, quantizer.codebook_dim))
    finally:
        torch.Tensor.__matmul__ = original
    assert seen == {"allow_tf32": False, "precision": "highest"}
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"


def test_precision_names():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("fp16", cpu) == torch.float16 and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(RunError, match="fp16"):
        resolve_precision("fp8", cpu)
    assert grad_scaler(cpu, torch.float16).is_enabled() and not grad_scaler(cpu, torch.bfloat16).is_enabled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_generator_step_follows_fp32(dtype):
    """Same gradient direction as fp32; under fp16 the scaler's factor is in the gradients until unscaled."""
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = tiny_models()
    _, reference_terms = generator_backward(reference, images, LOSS_CFG, gan_active=True, loss_scale=1.0,
                                            dtype=torch.float32)
    models = tiny_models()
    scaler = grad_scaler(images.device, dtype)
    _, terms = generator_backward(models, images, LOSS_CFG, gan_active=True, loss_scale=1.0, dtype=dtype, scaler=scaler)
    optimizer = torch.optim.SGD(models.raw_vqgan.parameters(), lr=0.0)
    if dtype == torch.float16:
        assert flat_grad(models.raw_vqgan).abs().max() > 100 * flat_grad(reference.raw_vqgan).abs().max()
    scaler.unscale_(optimizer)
    grads = flat_grad(models.raw_vqgan)
    assert torch.isfinite(grads).all() and all(torch.isfinite(v).all() for v in terms.values())
    for key, tolerance in (("l1", 0.02), ("quant_loss", 0.02), ("g_loss", 0.05), ("disc_weight", 0.1)):
        assert terms[key].item() == pytest.approx(reference_terms[key].item(), rel=tolerance), key
    # at random init GroupNorm's backward cancels most of each gradient: half-precision rounding
    # alone leaves a cosine of about 0.7 with fp32 (0.69 for bf16 before this step's changes too)
    assert cosine(grads, flat_grad(reference.raw_vqgan)) > 0.5


class ProbePerceptual(torch.nn.Module):
    """A stand-in for LPIPS that remembers one tensor only its own autograd graph keeps alive."""

    def forward(self, images, recon):
        hidden = recon * 2.0
        self.saved = weakref.ref(hidden)
        return (hidden.sin() * images).flatten(1).mean(1)   # SinBackward keeps `hidden`


class ProbeDiscriminator(NLayerDiscriminator):
    def forward(self, *inputs):
        gc.collect()
        self.perceptual_graph_alive = self.probe.saved() is not None
        return super().forward(*inputs)


def test_the_reconstruction_loss_graph_is_freed_before_the_discriminator_pass():
    torch.manual_seed(0)
    vqgan, perceptual = VQGAN(VQGAN_PRESETS["tiny"]), ProbePerceptual()
    disc = ProbeDiscriminator(3, 16, 2)
    disc.probe = perceptual
    models = VQGANModels(vqgan, disc, vqgan, disc, perceptual)
    cfg = dataclasses.replace(LOSS_CFG, perceptual_weight=1.0)
    generator_backward(models, torch.rand(2, 3, 32, 32) * 2 - 1, cfg, gan_active=True, loss_scale=1.0,
                       dtype=torch.float32)
    assert disc.perceptual_graph_alive is False


def quantizer_config(**changes):
    return dataclasses.replace(VQGAN_PRESETS["tiny"], codebook_size=16, codebook_dim=4, z_channels=4, **changes)


def test_dead_code_restarts_count_optimizer_steps_under_accumulation():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(quantizer_config(dead_code_steps=2)).train()
    z = torch.randn(1, 4, 1, 1)   # one position: one code used per micro-step, 15 unused
    restarted = []
    for _ in range(3):   # optimizer steps of 2 micro-steps each
        for _ in range(2):
            quantizer(z)
        restarted.append(len(quantizer.restart_dead_codes()))   # the trainer's call after each optimizer step
    # unused for 2 optimizer steps = at the end of the second step (all 15), not after 2 micro-steps
    assert restarted[:2] == [0, 15]


def test_the_vqgan_refuses_weight_decay():
    with pytest.raises(ValueError, match="weight-decay"):
        dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], weight_decay=0.01)


def assert_finite_gan_run(run_dir, steps: int) -> dict:
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert "d_loss" in records[-1] and records[-1]["disc_weight"] > 0 and records[-1]["skipped_steps"] == 0
    state = load(latest_checkpoint(run_dir))
    assert state["step"] == steps
    return state


@pytest.mark.parametrize("flags", [["--precision=bf16", "--channels-last=true"], ["--precision=fp16"]],
                         ids=["bf16-channels-last", "fp16"])
def test_vqgan_trainer_in_half_precision(flags, shapes_shards, tmp_path):
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "run", 4, "--grad-accum=2", *flags))
    state = assert_finite_gan_run(tmp_path / "run", 4)
    assert len(state["rank_checksums"]) == 1
    if "--precision=fp16" in flags:
        assert state["scaler_g"]["scale"] > 0 and state["scaler_d"]["scale"] > 0
    else:   # a channels_last run's checkpoint loads into a plain model: the quantizer's codes are that model's
        run_script("image_quantizer.py", f"--vqgan={tmp_path / 'run'}", f"--data={shapes_shards}",
                   f"--out={tmp_path / 'tokens'}", "--progress=false")
        images, _ = ShardSplit(shapes_shards, "train").read(np.arange(16))
        tokens, _ = ShardSplit(tmp_path / "tokens", "train").read(np.arange(16))
        vqgan = VQGAN(VQGAN_PRESETS["tiny"])
        vqgan.load_state_dict(state["vqgan"])
        codes = vqgan.eval().encode_to_indices(to_unit_range(torch.from_numpy(images)))
        assert torch.equal(codes, torch.from_numpy(tokens.astype(np.int64)))


def test_fp16_vqgan_scaler_state_is_saved_and_restored(shapes_shards, tmp_path):
    vqgan_run = tmp_path / "vqgan"
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, vqgan_run, 3, "--precision=fp16"))
    checkpoint = latest_checkpoint(vqgan_run)
    state = load(checkpoint)
    state["scaler_g"]["scale"], state["scaler_d"]["scale"] = 1024.0, 512.0   # as an earlier overflow would leave them
    torch.save(state, checkpoint)
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, vqgan_run, 4, "--precision=fp16"))
    resumed = load(latest_checkpoint(vqgan_run))
    assert (resumed["step"], resumed["scaler_g"]["scale"], resumed["scaler_d"]["scale"]) == (4, 1024.0, 512.0)


def test_fp16_gpt_scaler_state_is_saved_and_restored(shapes_tokens, tmp_path):
    gpt_run = tmp_path / "gpt"
    run_script("train_gpt.py", *gpt_args(shapes_tokens, gpt_run, 2, "--sample-count=0", "--precision=fp16"))
    checkpoint = latest_checkpoint(gpt_run)
    state = load(checkpoint)
    assert state["scaler"]["scale"] == 65536.0
    state["scaler"]["scale"] = 256.0
    torch.save(state, checkpoint)
    run_script("train_gpt.py", *gpt_args(shapes_tokens, gpt_run, 3, "--sample-count=0", "--precision=fp16"))
    resumed = load(latest_checkpoint(gpt_run))
    assert resumed["step"] == 3 and resumed["scaler"]["scale"] == 256.0
    assert all(np.isfinite(r["loss"]) for r in train_records(gpt_run))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpt_trainer_in_half_precision(precision, shapes_tokens, tmp_path):
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "run", 3, "--sample-count=0",
                                         f"--precision={precision}"))
    records = train_records(tmp_path / "run")
    assert len(records) == 3 and all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in records)
    assert load(latest_checkpoint(tmp_path / "run"))["step"] == 3


def test_quantizer_sampling_and_evaluation_in_bf16(tiny_vqgan_run, shapes_shards, shapes_tokens, tmp_path):
    out = tmp_path / "tokens"
    run_script("image_quantizer.py", f"--vqgan={tiny_vqgan_run}", f"--data={shapes_shards}", f"--out={out}",
               "--precision=bf16", "--progress=false")
    fp32_codes, _ = ShardSplit(shapes_tokens, "val").read(np.arange(100))
    bf16_codes, _ = ShardSplit(out, "val").read(np.arange(100))
    assert (fp32_codes == bf16_codes).mean() > 0.9   # bf16 encoder features move a few codes across borders

    gpt_run = tmp_path / "gpt"
    run_script("train_gpt.py", *gpt_args(shapes_tokens, gpt_run, 1, "--sample-count=0"))
    run_script("sample.py", f"--gpt={gpt_run}", "--n=2", "--precision=bf16", f"--out={tmp_path / 'samples'}")
    assert (tmp_path / "samples" / "sample_001.png").is_file()

    vqgan = VQGAN(VQGAN_PRESETS["tiny"])
    vqgan.load_state_dict(load(latest_checkpoint(tiny_vqgan_run))["vqgan"])
    metrics = {dtype: evaluate(vqgan, None, ShardSplit(shapes_shards, "val"), 50, 256, torch.device("cpu"), dtype)[0]
               for dtype in (torch.float32, torch.bfloat16)}
    assert metrics[torch.bfloat16]["psnr"] == pytest.approx(metrics[torch.float32]["psnr"], abs=0.2)


@pytest.mark.parametrize("flags", [("--channels-last=true",),
                                   pytest.param(("--compile=true", "--channels-last=true"), marks=pytest.mark.slow)])
def test_quantizer_channels_last_and_compiled_write_the_eager_codes(flags, tiny_vqgan_run, shapes_shards,
                                                                    shapes_tokens, tmp_path):
    out = tmp_path / "tokens"
    run_script("image_quantizer.py", f"--vqgan={tiny_vqgan_run}", f"--data={shapes_shards}", f"--out={out}",
               "--progress=false", *flags)
    eager, _ = ShardSplit(shapes_tokens, "train").read(np.arange(400))
    other, _ = ShardSplit(out, "train").read(np.arange(400))
    # fp32 throughout: only near-ties may fall the other way (measured: 1 of 25600 codes channels_last, 0 compiled)
    assert (eager == other).mean() > 0.999


def compiled_backward_counts(fn) -> tuple[int, int]:
    """(compiled forwards, compiled backwards) that `fn` runs, from the profiler's event names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    names = [event.name for event in profile.events()]
    return names.count("CompiledFunction"), names.count("CompiledFunctionBackward")


@pytest.mark.slow
def test_a_compiled_gan_step_runs_one_backward_and_agrees_with_eager():
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    eager, compiled = tiny_models(), tiny_models()
    compiled.vqgan = torch.compile(compiled.raw_vqgan)
    step = lambda models: generator_backward(models, images, LOSS_CFG, gan_active=True, loss_scale=1.0,  # noqa: E731
                                             dtype=torch.float32)
    step(compiled)   # compiles
    compiled.raw_vqgan.zero_grad(set_to_none=True)
    forwards, backwards = compiled_backward_counts(lambda: step(compiled))
    # each compiled graph (graph breaks split the model: the quantizer's bincount of code usage has a data-dependent
    # shape) runs its backward once: the adaptive weight's two gradients add none
    assert forwards >= 1 and backwards == forwards
    step(eager)
    eager.raw_vqgan.zero_grad(set_to_none=True)
    step(eager)
    compiled_grad, eager_grad = flat_grad(compiled.raw_vqgan), flat_grad(eager.raw_vqgan)
    # both fp32: inductor's fused kernels only sum in another order. Measured (one and two threads): the whole
    # gradient within 6.0e-6 of eager in norm, each element within 5.7e-6 x the largest (0.093); a few conv biases'
    # gradients are zero but for rounding (~1e-8), so the tolerance is absolute in units of the largest gradient,
    # not of each tensor's own. Rounding the gradients to bf16 alone is 1.7e-3 in norm.
    assert (compiled_grad - eager_grad).norm() / eager_grad.norm() < 1e-4
    largest = eager_grad.abs().max().item()
    for name, parameter in compiled.raw_vqgan.named_parameters():
        reference = dict(eager.raw_vqgan.named_parameters())[name].grad
        # measured: at most 0.17 of this tolerance
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-4, atol=2e-5 * largest, msg=name)


@pytest.mark.slow
def test_vqgan_trainer_compiled_resume_continues_the_same_run(shapes_shards, tmp_path):
    # a restart every step: the compiled forward's usage counts and candidates reach restart_dead_codes
    flags = ("--compile=true", "--channels-last=true", "--ckpt-every=2", "--dead-code-steps=1")
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "full", 4, *flags), timeout=900)
    run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 4, *flags, "--stop-at-step=2"),
               timeout=900)
    result = run_script("train_resnet_vqgan.py", *vqgan_args(shapes_shards, tmp_path / "split", 4, *flags), timeout=900)
    assert "resumed from" in result.stdout + result.stderr
    assert_finite_gan_run(tmp_path / "full", 4)
    assert_finite_gan_run(tmp_path / "split", 4)
    full, split = train_records(tmp_path / "full"), train_records(tmp_path / "split")
    assert sum(r["codes_restarted"] for r in full) > 0
    for a, b in zip(full, split):
        for key in ("l1", "rec_loss", "d_loss", "grad_norm", "codes_restarted"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.slow
def test_gpt_trainer_compiled_resume_follows_the_eager_run(shapes_tokens, tmp_path):
    # no dropout: inductor draws other masks than eager (with the tiny preset's 0.1 the losses differed by up to
    # 1.6e-3); without it both runs are fp32 and differ only in summation order
    no_dropout = ("--sample-count=0", "--dropout=0")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "eager", 4, *no_dropout))
    run_script("train_gpt.py", *gpt_args(shapes_tokens, tmp_path / "compiled", 4, *no_dropout, "--compile=true",
                                         "--stop-at-step=2"),
               timeout=900)
    result = run_script("train_gpt.py",
                        *gpt_args(shapes_tokens, tmp_path / "compiled", 4, *no_dropout, "--compile=true"), timeout=900)
    assert "resumed from" in result.stdout + result.stderr
    eager, compiled = train_records(tmp_path / "eager"), train_records(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled):
        # measured: losses within 9.4e-8 (one fp32 ulp), gradient norms within 1.2e-7
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
    assert load(latest_checkpoint(tmp_path / "compiled"))["step"] == 4


@pytest.fixture(scope="module")
def one_step_gpt(shapes_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_for_sampling")
    run_script("train_gpt.py", *gpt_args(shapes_tokens, out, 1, "--sample-count=0"))
    return out


def greedy_samples(gpt_run, out, *flags) -> tuple[np.ndarray, list[str], list[str]]:
    """sample.py in this process, greedy (the same tokens whatever the kernels): its images, what it compiled
    and the VQGAN's memory format."""
    import sample
    from vqgpt.config import parse_config
    from vqgpt.settings import SampleConfig

    compiled, real_compile = [], torch.compile
    cfg = parse_config(SampleConfig, {}, [f"--gpt={gpt_run}", f"--out={out}", "--n=4", "--temperature=0",
                                          "--device=cpu", *flags])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or real_compile(fn, **kw))
        formats = spy_vqgan_memory_format(patch, sample)
        assert sample.main(cfg) == 0
    images = np.stack([np.asarray(Image.open(out / f"sample_{i:03d}.png")) for i in range(4)])
    return images, compiled, formats


@pytest.mark.parametrize("flags", [("--channels-last=true",),
                                   pytest.param(("--compile=true", "--channels-last=true"), marks=pytest.mark.slow)])
def test_sampling_channels_last_and_compiled_draw_the_eager_images(flags, one_step_gpt, tmp_path):
    eager, _, eager_format = greedy_samples(one_step_gpt, tmp_path / "eager")
    other, compiled, other_format = greedy_samples(one_step_gpt, tmp_path / "other", *flags)
    assert (eager_format, other_format) == (["contiguous"], ["channels_last"])   # the flag reached the decoder
    assert sorted(compiled) == (["decode_indices", "encode_to_indices", "forward", "forward"]
                                if "--compile=true" in flags else [])
    assert np.abs(eager.astype(int) - other.astype(int)).max() <= 2   # the same codes; the decoder's sums may round
