"""Benchmark one VQGAN training step (GAN phase: L1 + LPIPS + quantizer + adaptive-weight GAN + discriminator).

    taskset -c 0 python bench/vqgan_step.py --preset b64 --batch-size 8      # one pinned thread + 2 ranks
    python bench/vqgan_step.py --preset seed --batch-size 8 --device cuda     # bf16 on a GPU
    taskset -c 1 python bench/vqgan_step.py --preset b64 --batch-size 8 --ranks 0 --skip-reference \
        --variants bf16,compile,bf16-compile                                  # precision and compile rows
    taskset -c 0 python bench/vqgan_step.py --preset b64 --batch-size 8 --ranks 0 --skip-reference --muon

Measured in the same run: this project's step; a reference step built the way taming-transformers
runs it (the autoencoder forward again for the discriminator pass, L1 + LPIPS recomputed there,
the adaptive weight by back-propagating both losses to the last layer); FLOPs per step from
torch.utils.flop_counter; the machine's fp32 GEMM and 3x3-conv peaks; 2 ranks under torchrun;
the --variants rows (bf16 autocast, torch.compile) on fresh models, with their speedup over the
first figure (fp32 eager on CPU); with --muon the step under the Muon optimizer beside Adam's. Last
line: one JSON object.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (add_rank_scaling, conv3x3_peak_gflops, count_flops, emit, gemm_peak_gflops,  # noqa: E402
                          parse_variants, setup_worker, single_process_device, training_bench_parser, variant_dtype)
from models.discriminator import NLayerDiscriminator  # noqa: E402
from models.perceptual import build_lpips  # noqa: E402
from models.vqgan import VQGAN, VQGAN_PRESETS  # noqa: E402
from vqgpt import distributed  # noqa: E402
from vqgpt.settings import VQGANTrainConfig  # noqa: E402
from vqgpt.losses import adaptive_weight, hinge_d_loss, hinge_g_loss  # noqa: E402
from vqgpt.optim import adam, vqgan_optimizer  # noqa: E402
from vqgpt.training import autocast, grad_scaler  # noqa: E402
from vqgpt.vqgan_step import (VQGANModels, after_optimizer_step, discriminator_backward,  # noqa: E402
                              generator_backward)

LOSS_CFG = VQGANTrainConfig()   # the trainer's default loss weights: L1 + LPIPS + the adaptive GAN term


def build(preset: str, device: torch.device, ddp: bool,
          optimizer: str = "adam") -> tuple[VQGANModels, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    config = VQGAN_PRESETS[preset]
    vqgan = VQGAN(config).to(device)
    disc = NLayerDiscriminator(3, config.disc_ndf, config.disc_layers).to(device)
    perceptual = build_lpips(None, random_backbone=True).to(device)   # same cost as the pretrained one
    models = VQGANModels(vqgan, disc, vqgan, disc, perceptual)
    if ddp:
        models.vqgan, models.discriminator = distributed.wrap_ddp(vqgan, device), distributed.wrap_ddp(disc, device)
    optimizers = [vqgan_optimizer(vqgan, optimizer, 1e-4, (0.5, 0.9), device),
                  adam(disc.parameters(), 1e-4, (0.5, 0.9), device)]
    return models, optimizers


def our_step(models: VQGANModels, optimizers, images, dtype, scalers=(None, None)):
    recon, _ = generator_backward(models, images, LOSS_CFG, gan_active=True, loss_scale=1.0, dtype=dtype,
                                  scaler=scalers[0])
    discriminator_backward(models, images, recon, 1.0, dtype, scalers[1])
    for optimizer, scaler in zip(optimizers, scalers):
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    after_optimizer_step(models.raw_vqgan, optimizers[0], skipped=False)   # the dead-code restarts, as the trainer


def taming_style_step(models: VQGANModels, optimizers, images, dtype):
    """The reference: what the official Lightning loop computes per step, rewritten on these modules."""
    vqgan, disc, perceptual = models.raw_vqgan, models.raw_discriminator, models.perceptual
    with autocast(images.device, dtype):
        recon, quant_loss, _, _ = vqgan(images)
        nll = ((images - recon).abs() + perceptual(images, recon).view(-1, 1, 1, 1)).mean()
        g_loss = hinge_g_loss(disc(recon))
    last = vqgan.last_layer
    weight = adaptive_weight(torch.autograd.grad(nll, last, retain_graph=True)[0],
                             torch.autograd.grad(g_loss, last, retain_graph=True)[0]) * 0.8
    (nll + weight * g_loss + quant_loss).backward()
    optimizers[0].step()
    optimizers[0].zero_grad(set_to_none=True)
    with autocast(images.device, dtype):   # optimizer 1: a second autoencoder forward, with its graph
        recon, quant_loss, _, _ = vqgan(images)
        ((images - recon).abs() + perceptual(images, recon).view(-1, 1, 1, 1)).mean()   # computed, unused
        d_loss = hinge_d_loss(disc(images.detach()), disc(recon.detach()))
    d_loss.backward()
    optimizers[1].step()
    optimizers[1].zero_grad(set_to_none=True)


def images_per_s(step_fn, models, optimizers, images, dtype, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):   # allocator, oneDNN primitive caches (and compilation)
        step_fn(models, optimizers, images, dtype)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(models, optimizers, images, dtype)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - start)


def worker(args) -> None:
    """One rank under torchrun: our step with DDP; rank 0 prints the global rate."""
    dist = setup_worker(args.device)
    models, optimizers = build(args.preset, dist.device, ddp=not args.independent)
    size = VQGAN_PRESETS[args.preset].image_size
    images = torch.rand(args.batch_size, 3, size, size, device=dist.device) * 2 - 1
    rate = images_per_s(our_step, models, optimizers, images, torch.float32, args.steps) * dist.world_size
    if dist.is_main:
        print('{"images_per_s": %f}' % rate)
    distributed.barrier()   # every rank done before gloo closes: a rank once aborted at exit under load
    distributed.cleanup()


def variant_rows(args, device: torch.device, base_dtype: torch.dtype, images: torch.Tensor, base_rate: float) -> dict:
    """images/s of each --variants row on fresh models, and its speedup over the first figure."""
    rows = {}
    for variant in parse_variants(args.variants):
        dtype = variant_dtype(variant, base_dtype)
        models, optimizers = build(args.preset, device, ddp=False)
        compiled = variant.endswith("compile")
        if compiled:
            models.vqgan = torch.compile(models.raw_vqgan)
        scalers = tuple(grad_scaler(device, dtype) for _ in optimizers) if dtype == torch.float16 else (None, None)
        rate = images_per_s(functools.partial(our_step, scalers=scalers), models, optimizers, images, dtype, args.steps,
                            warmup=3 if compiled else 1)
        name = variant.replace("-", "_")
        rows[f"images_per_s_{name}"] = rate
        rows[f"{name}_speedup"] = rate / base_rate
    return rows


def main() -> None:
    parser = training_bench_parser(__doc__, VQGAN_PRESETS, "b64", default_steps=4)
    parser.add_argument("--skip-reference", action="store_true", help="skip the taming-style reference step")
    parser.add_argument("--muon", action="store_true",
                        help="also time our step with --optimizer muon on fresh models (images_per_s_muon, "
                             "muon_vs_adam against the first figure)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    device, dtype = single_process_device(args.device)
    models, optimizers = build(args.preset, device, ddp=False)
    size = VQGAN_PRESETS[args.preset].image_size
    images = torch.rand(args.batch_size, 3, size, size, device=device) * 2 - 1
    results = {"preset": args.preset, "batch_size": args.batch_size, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    flops = count_flops(lambda: our_step(models, optimizers, images, dtype))
    results["gflops_per_step"] = flops / 1e9
    results["images_per_s"] = images_per_s(our_step, models, optimizers, images, dtype, args.steps)
    if not args.skip_reference:
        reference_flops = count_flops(lambda: taming_style_step(models, optimizers, images, dtype))
        results["reference_gflops_per_step"] = reference_flops / 1e9
        results["reference_images_per_s"] = images_per_s(taming_style_step, models, optimizers, images, dtype,
                                                         args.steps)
        results["speedup_vs_reference"] = results["images_per_s"] / results["reference_images_per_s"]
    results.update(variant_rows(args, device, dtype, images, results["images_per_s"]))
    if args.muon:
        muon_models, muon_optimizers = build(args.preset, device, ddp=False, optimizer="muon")
        results["images_per_s_muon"] = images_per_s(our_step, muon_models, muon_optimizers, images, dtype, args.steps)
        results["muon_vs_adam"] = results["images_per_s_muon"] / results["images_per_s"]
    achieved = flops / 1e9 * results["images_per_s"] / args.batch_size
    results["achieved_gflops"] = achieved
    peak_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    results["gemm_peak_gflops"] = gemm_peak_gflops(device, peak_dtype, 4096 if device.type == "cuda" else 1024)
    results["conv3x3_peak_gflops"] = conv3x3_peak_gflops(device, peak_dtype)
    results["mfu"] = achieved / results["gemm_peak_gflops"]
    results["mfu_vs_conv_peak"] = achieved / results["conv3x3_peak_gflops"]
    if args.ranks > 1 and device.type == "cpu":
        add_rank_scaling(results, __file__, args, "images_per_s")
    emit(results)


if __name__ == "__main__":
    main()
