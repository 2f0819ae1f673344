"""Colour figures of a VQGAN's reconstructions and a linear probe of where its encoder carries colour.

The definitions the colour tables of docs/experiments.md (runs 17-118) and BENCHMARKS.md were measured with:
- chroma of a pixel: the pixel minus its grey level, the mean of its three channels (vqgpt/losses.py
  scale_chroma, the loss's --chroma-weight, splits the same way);
- `chroma` (chroma_std_ratio): the standard deviation of the reconstructions' chroma over that of the
  originals', over every channel, pixel and image (1: as saturated as the originals; 0: grey);
- `chroma err` / `colour error` (chroma_error): the chroma part of the reconstructions' squared error,
  the mean over every channel, pixel and image of (chroma(recon) - chroma(original))^2, in [-1, 1]
  units (images as the networks see them; answering grey everywhere scores the originals' mean
  squared chroma, grey_chroma_error);
- the probe (runs 97-106): a ridge regression from a layer's output, average-pooled to the token
  grid, to each token patch's mean chroma; R^2 on images it was not fitted on.

Images are either uint8 (N, H, W, 3), as the shards hold them, or float (N, 3, H, W) already in
[-1, 1], as the networks take them (numpy arrays or torch tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# the probe's ridge penalty, relative: features are standardised on the fitted images, so this is a
# fraction of each feature's own variance (small; it only keeps near-constant features from blowing up)
PROBE_RIDGE = 1e-3


def as_unit_range(images) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float64 (N, 3, H, W) in [-1, 1]; a float (N, 3, H, W) array as float64 unchanged."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {images.shape}")
        return images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {images.shape}")
    return images.astype(np.float64)


def chroma(images) -> np.ndarray:
    """(N, 3, H, W) float64: each pixel minus its grey level (the mean of its three channels)."""
    x = as_unit_range(images)
    return x - x.mean(axis=1, keepdims=True)


def chroma_std_ratio(originals, recon) -> float:
    """std of the reconstructions' chroma over the originals' (every channel, pixel and image)."""
    return float(chroma(recon).std() / chroma(originals).std())


def chroma_error(originals, recon) -> float:
    """Mean squared difference of chroma, [-1, 1] units: the colour part of the squared error."""
    return float(np.mean((chroma(recon) - chroma(originals)) ** 2))


def grey_chroma_error(originals) -> float:
    """The chroma error of a grey answer (chroma 0 everywhere): the originals' mean squared chroma."""
    return float(np.mean(chroma(originals) ** 2))


def pool_to_grid(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, C, H, W) -> (N, C, h, w): the mean over each of the h x w patches (H, W multiples of h, w)."""
    n, c, height, width = maps.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"a {height} x {width} map does not split into a {h} x {w} grid")
    return maps.reshape(n, c, h, height // h, w, width // w).mean(axis=(3, 5))


def patch_chroma(images, grid: tuple[int, int]) -> np.ndarray:
    """(N, 3, h, w): the mean chroma of each token patch, the probe's target."""
    return pool_to_grid(chroma(images), grid)


def _samples(maps: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N*h*w, C): one sample per image and grid position."""
    maps = np.asarray(maps, dtype=np.float64)
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


def ridge_probe_r2(fit_features, fit_targets, score_features, score_targets, ridge: float = PROBE_RIDGE) -> float:
    """R^2 on the score set of a ridge regression fitted on the fit set.

    Features (N, C, h, w) already at the targets' grid, targets (N, K, h, w); every image and grid
    position is one sample. Features are standardised and targets centred with the fit set's
    statistics; the penalty is `ridge` x the number of fitted samples (on standardised features).
    R^2 = 1 - residual sum of squares / the score targets' sum of squares about their own mean,
    both summed over the K outputs; 1 is perfect, 0 is no better than a constant, below 0 worse.
    NaN when the score targets do not vary (grey images: no colour to explain).
    """
    x_fit, y_fit = _samples(fit_features), _samples(fit_targets)
    x_score, y_score = _samples(score_features), _samples(score_targets)
    if len(x_fit) != len(y_fit) or len(x_score) != len(y_score):
        raise ValueError("features and targets must have the same images and grid")
    x_mean, x_std = x_fit.mean(0), x_fit.std(0)
    x_std[x_std == 0] = 1.0
    y_mean = y_fit.mean(0)
    x_fit = (x_fit - x_mean) / x_std
    gram = x_fit.T @ x_fit + ridge * len(x_fit) * np.eye(x_fit.shape[1])
    weights = np.linalg.solve(gram, x_fit.T @ (y_fit - y_mean))
    predicted = (x_score - x_mean) / x_std @ weights + y_mean
    total = ((y_score - y_score.mean(0)) ** 2).sum()
    if total == 0:
        return float("nan")
    return float(1.0 - ((y_score - predicted) ** 2).sum() / total)


@dataclass
class EncoderFeatures:
    """What one pass of a VQGAN gives the probe: every encoder level's output and the quantized latent,
    average-pooled to the token grid, and (when asked) the reconstructions, all in numpy."""
    levels: list[np.ndarray]           # level l: (N, C_l, h, w)
    lookup: np.ndarray                 # the quantizer's output z_q: (N, C, h, w)
    recon: np.ndarray | None = None    # (N, 3, H, W) in [-1, 1], clamped as the trainer's eval clamps


def level_inputs(encoder) -> list[torch.nn.Module]:
    """The module that reads each encoder level's output: the next level's first block, then the middle.

    Level l's output is taken as the next module's input so that it holds everything the level adds
    (its blocks, its downsampling and, with --pooled-input, the pooled image)."""
    return [encoder.levels[level + 1].blocks[0] for level in range(len(encoder.levels) - 1)] + [encoder.mid]


@torch.no_grad()
def encoder_features(vqgan, images, batch_size: int = 100, keep_recon: bool = False) -> EncoderFeatures:
    """Run `images` through the VQGAN (encoder and quantizer; the decoder too with keep_recon), in eval mode."""
    grid = vqgan.latent_grid
    device = next(vqgan.parameters()).device
    x = as_unit_range(images)
    captured: list[list[np.ndarray]] = [[] for _ in vqgan.encoder.levels]

    def hook_for(level):
        def hook(module, args):
            captured[level].append(F.adaptive_avg_pool2d(args[0].float(), grid).cpu().numpy())
        return hook

    handles = [module.register_forward_pre_hook(hook_for(level))
               for level, module in enumerate(level_inputs(vqgan.encoder))]
    was_training = vqgan.training
    vqgan.eval()
    lookups, recons = [], []
    try:
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start:start + batch_size]).float().to(device)
            z_q = vqgan.encode(batch)[0]
            lookups.append(z_q.float().cpu().numpy())
            if keep_recon:
                recons.append(vqgan.decode(z_q).float().clamp(-1, 1).cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
        vqgan.train(was_training)
    return EncoderFeatures([np.concatenate(parts) for parts in captured], np.concatenate(lookups),
                           np.concatenate(recons) if keep_recon else None)


def probe_features(fit: EncoderFeatures, fit_images, score: EncoderFeatures, score_images,
                   grid: tuple[int, int]) -> dict:
    """R^2 per encoder level ("levels", in the encoder's order) and of the quantized latent ("lookup")."""
    fit_targets, score_targets = patch_chroma(fit_images, grid), patch_chroma(score_images, grid)
    return {"levels": [ridge_probe_r2(f, fit_targets, s, score_targets) for f, s in zip(fit.levels, score.levels)],
            "lookup": ridge_probe_r2(fit.lookup, fit_targets, score.lookup, score_targets)}


def probe_encoder(vqgan, fit_images, score_images, batch_size: int = 100) -> dict:
    """Where a VQGAN carries colour: fitted on `fit_images`, R^2 on `score_images` (the bench: train
    images, then val images), one R^2 per encoder level and one for the quantized latent."""
    fit = encoder_features(vqgan, fit_images, batch_size)
    score = encoder_features(vqgan, score_images, batch_size)
    return probe_features(fit, fit_images, score, score_images, vqgan.latent_grid)
