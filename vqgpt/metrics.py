"""Evaluation metrics: PSNR, SSIM, codebook usage."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for float images in [-1, 1] (B, C, H, W) -> (B,)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    y = (references.float().clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    kernel_1d = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    return (kernel_1d[:, None] * kernel_1d[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(images: torch.Tensor, references: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, data range 1) -> (B,)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    y = (references.float().clamp(-1, 1) + 1) / 2
    channels = x.shape[1]
    window_size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(window_size, sigma, channels, x.device)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def codebook_usage(histogram: torch.Tensor) -> dict[str, float]:
    """Share of codes used at least once, and perplexity exp(H) of the code distribution."""
    counts = histogram.double()
    total = counts.sum().item()
    if total == 0:
        return {"codebook_usage": 0.0, "perplexity": 0.0, "codes_used": 0}
    probs = counts[counts > 0] / total
    entropy = -(probs * probs.log()).sum().item()
    used = int((counts > 0).sum().item())
    return {"codebook_usage": used / len(counts), "perplexity": math.exp(entropy), "codes_used": used}
