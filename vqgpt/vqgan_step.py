"""One VQGAN training step and the validation pass, shared by the trainer, tests and benchmarks.

The step runs the autoencoder forward once. Gradients of the reconstruction loss and of the
generator's GAN loss are taken with respect to the reconstruction, so LPIPS and the
discriminator are back-propagated once each; the adaptive weight then only needs the weight
gradients of the decoder's last convolution, computed from its saved input without any backward
pass (under torch.compile an autograd.grad would rerun the whole compiled backward). The
discriminator sees `recon.detach()`: its loss cannot reach the VQGAN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vqgpt import distributed
from vqgpt.images import to_unit_range, to_uint8
from vqgpt.losses import adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from vqgpt.metrics import codebook_usage, psnr, ssim
from vqgpt.optim import reset_moments
from vqgpt.runlog import progress as progress_bar
from vqgpt.training import autocast


@dataclass
class VQGANModels:
    vqgan: torch.nn.Module           # possibly DDP/compile-wrapped
    discriminator: torch.nn.Module   # possibly DDP-wrapped
    raw_vqgan: torch.nn.Module
    raw_discriminator: torch.nn.Module
    perceptual: torch.nn.Module | None


def state_changed_by_forward(models: VQGANModels, gan_active: bool) -> list[torch.Tensor]:
    """The tensors a training forward changes in place: the discriminator's BatchNorm statistics (the
    quantizer's code usage is dropped by `after_optimizer_step`). A skipped step puts them back."""
    return list(models.raw_discriminator.buffers()) if gan_active else []


def after_optimizer_step(vqgan: torch.nn.Module, optimizer: torch.optim.Optimizer, skipped: bool) -> int:
    """Dead-code restarts, once per optimizer step and outside any graph: the rows restarted start with fresh
    optimizer moments. A skipped step ages no code. Returns the number of codes restarted."""
    quantizer = vqgan.quantizer
    if skipped:
        quantizer.discard_step_usage()
        return 0
    restarted = quantizer.restart_dead_codes()
    if len(restarted):
        reset_moments(optimizer, quantizer.codebook, restarted)
    return len(restarted)


class _InputCapture:
    """Forward pre-hook that keeps a module's latest training input (one hook object, so compile guards
    stay stable); evaluation and sampling forwards keep nothing alive."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __call__(self, module, inputs):
        if module.training:
            self.value = inputs[0]


def last_conv_input(vqgan: torch.nn.Module) -> _InputCapture:
    """The capture on the decoder's last convolution, installed once."""
    conv = vqgan.decoder.conv_out
    if not hasattr(conv, "input_capture"):
        conv.input_capture = _InputCapture()
        conv.register_forward_pre_hook(conv.input_capture)
    return conv.input_capture


def conv_weight_grad(conv: torch.nn.Conv2d, inputs: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """dL/dW of `conv` from its input and dL/d(output), in fp32: the weight gradient alone."""
    return torch.nn.grad.conv2d_weight(inputs.float(), conv.weight.shape, grad_output.float(), conv.stride,
                                       conv.padding, conv.dilation, conv.groups)


def generator_backward(models: VQGANModels, images: torch.Tensor, cfg, gan_active: bool, loss_scale: float,
                       dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, dict]:
    """Forward the VQGAN once and back-propagate L_rec + L_q + lambda * w * L_G into it.

    `scaler` (fp16) scales every gradient that passes through half-precision layers. Returns the
    detached reconstruction (for the discriminator) and the logged terms.
    """
    capture = last_conv_input(models.raw_vqgan)
    with autocast(images.device, dtype):
        recon, quant_loss, indices, stats = models.vqgan(images)
    conv_input, capture.value = capture.value, None
    # L1 and LPIPS in fp32, as in evaluation
    rec_loss, terms = reconstruction_loss(images, recon.float(), models.perceptual, cfg.l1_weight,
                                          cfg.perceptual_weight, cfg.l2_weight, cfg.chroma_weight)
    unit = scaler.scale(torch.ones((), device=images.device)) if scaler is not None else 1.0
    # no retain_graph: this runs (and frees) only the loss graph above `recon`, never the autoencoder's
    grad_recon = torch.autograd.grad(rec_loss * unit, recon)[0].float() / unit
    if gan_active:
        with autocast(images.device, dtype):
            logits_fake = models.raw_discriminator(recon)
        gan_loss = hinge_g_loss(logits_fake)
        grad_gan = torch.autograd.grad(gan_loss * unit, recon)[0].float() / unit
        if cfg.adaptive_disc_weight:
            conv = models.raw_vqgan.decoder.conv_out
            weight = adaptive_weight(conv_weight_grad(conv, conv_input, grad_recon),
                                     conv_weight_grad(conv, conv_input, grad_gan), cfg.disc_weight_max) * cfg.disc_weight
        else:
            weight = torch.tensor(cfg.disc_weight, device=images.device)
        grad_recon = grad_recon + weight * grad_gan
        terms.update(g_loss=gan_loss.detach(), disc_weight=weight.detach())
    total_scale = loss_scale * unit
    torch.autograd.backward([recon, quant_loss], [grad_recon * total_scale,
                                                  torch.ones_like(quant_loss) * total_scale])
    terms.update(rec_loss=rec_loss.detach(), quant_loss=quant_loss.detach(),
                 batch_perplexity=stats["perplexity"].float())
    return recon.detach(), terms


def discriminator_backward(models: VQGANModels, images: torch.Tensor, recon_detached: torch.Tensor,
                           loss_scale: float, dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Hinge loss on real vs. detached reconstructions, in one DDP forward of two batches."""
    with autocast(images.device, dtype):
        logits_real, logits_fake = models.discriminator(images, recon_detached)
        d_loss = hinge_d_loss(logits_real, logits_fake)
    scaled = d_loss * loss_scale
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean()}


@torch.no_grad()
def evaluate(vqgan: torch.nn.Module, perceptual: torch.nn.Module | None, val_split, batch_size: int,
             codebook_size: int, device: torch.device, dtype: torch.dtype, grid_images: int = 8, *,
             inception=None, reference_stats: dict | None = None, rank: int = 0, world_size: int = 1,
             progress: str | bool = False) -> tuple[dict | None, list]:
    """Metrics over the whole val split; codebook usage counts every code hit in the pass.

    With an `inception` (vqgpt.fid.Inception) and the originals' `reference_stats`, also rFID.
    Batch k runs on rank k % world_size and rank 0 adds the batches up in order, so every world
    size gives the one-process numbers; the other ranks get (None, []).
    """
    was_training = vqgan.training
    vqgan.eval()
    per_batch: dict[int, tuple] = {}   # start -> (metric sums, code histogram, reconstructions' features)
    grid_rows: list = []
    starts = range(rank * batch_size, len(val_split), world_size * batch_size)
    for start in progress_bar(progress, starts, enabled=rank == 0, desc="reconstruct", unit="batch"):
        items, _ = val_split.read(np.arange(start, min(start + batch_size, len(val_split))))
        images = to_unit_range(torch.from_numpy(items).to(device))
        with autocast(device, dtype):
            recon, _, indices, _ = vqgan(images)
        recon = recon.float().clamp(-1, 1)
        sums = {"l1": (images - recon).abs().flatten(1).mean(1).sum().item(),
                "psnr": psnr(recon, images).sum().item(), "ssim": ssim(recon, images).sum().item()}
        if perceptual is not None:
            sums["lpips"] = perceptual(images, recon).sum().item()
        histogram = torch.bincount(indices.flatten(), minlength=codebook_size).cpu()
        features = inception.features(to_uint8(recon)).pool if inception is not None else None
        if start == 0:
            grid_rows = [items[:grid_images], to_uint8(recon[:grid_images])]
        per_batch[start] = (sums, histogram, features, len(items))
    vqgan.train(was_training)
    # the trainers evaluate on rank 0 alone (world_size 1): no collective then
    gathered = distributed.gather_to_main(per_batch) if world_size > 1 else [per_batch]
    if gathered is None:
        return None, []
    batches = {start: part for parts in gathered for start, part in parts.items()}
    ordered = [batches[start] for start in sorted(batches)]
    totals = {key: 0.0 for key in ordered[0][0]} if ordered else {}
    histogram = torch.zeros(codebook_size, dtype=torch.long)
    for sums, batch_histogram, _, _ in ordered:
        for key, value in sums.items():
            totals[key] += value
        histogram += batch_histogram
    seen = sum(count for *_, count in ordered)
    metrics = {key: value / max(seen, 1) for key, value in totals.items()}
    metrics.update(codebook_usage(histogram))
    metrics["val_images"] = seen
    if inception is not None:
        from vqgpt.fid import fid_statistics, frechet_distance

        metrics["rfid"] = frechet_distance(fid_statistics(np.concatenate([b[2] for b in ordered])), reference_stats)
    return metrics, grid_rows
