"""GPT training step, validation loss and sample grids, shared by the trainer, tests and benchmarks."""
from __future__ import annotations

import numpy as np
import torch

from models.gpt import GPT, make_condition_tokens
from vqgpt.images import image_grid, to_uint8
from vqgpt.sampling import sample_tokens
from vqgpt.training import autocast


def condition_and_inputs(tokens: torch.Tensor, labels: torch.Tensor | None, model: GPT, drop_prob: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[cond, t0 .. t_{L-2}]: the class (or start) token, then the grid shifted right by one."""
    config = model.config
    cond = make_condition_tokens(None if labels is None or config.n_classes == 0 else labels.cpu(),
                                 config.codebook_size, config.n_classes, drop_prob, generator,
                                 batch_size=len(tokens)).to(tokens.device)
    return torch.cat([cond.view(-1, 1), tokens[:, :-1]], dim=1)


def gpt_loss(model: torch.nn.Module, raw_model: GPT, tokens: torch.Tensor, labels: torch.Tensor | None,
             drop_prob: float, dtype: torch.dtype) -> torch.Tensor:
    inputs = condition_and_inputs(tokens, labels, raw_model, drop_prob)
    with autocast(tokens.device, dtype):
        _, loss = model(inputs, tokens)
    return loss


@torch.no_grad()
def validation_loss(model: GPT, val_split, batch_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """Mean cross-entropy in nats per token over the whole val split (conditional when labelled)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for items, labels in val_split.iter_batches(batch_size):
        tokens = torch.from_numpy(items.astype("int64")).to(device)
        label_tensor = None if labels is None else torch.from_numpy(labels)
        loss = gpt_loss(model, model, tokens, label_tensor, 0.0, dtype)
        total += loss.item() * len(items)
        count += len(items)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def sample_grid(model: GPT, vqgan: torch.nn.Module, count: int, latent_grid: tuple[int, int], *, seed: int,
                temperature: float = 1.0, top_k: int | None = None, device: torch.device) -> "np.ndarray":
    """Blind (or one-per-class) samples decoded by the VQGAN, tiled into rows of 8."""
    generator = torch.Generator(device=device).manual_seed(seed)
    n_classes = model.config.n_classes
    labels = torch.arange(count, device=device) % n_classes if n_classes else None
    tokens = sample_tokens(model, count, labels=labels, temperature=temperature, top_k=top_k or None,
                           generator=generator)
    images = to_uint8(vqgan.decode_indices(tokens.to(device)))
    return image_grid([images[i:i + 8] for i in range(0, count, 8)])
