"""Sampling token grids from the GPT: KV cache, temperature, top-k, top-p, classifier-free guidance.

Ids outside the codebook (class and start tokens) are cut from every prediction before
sampling, so they can never be drawn; nothing is resampled in a loop.
"""
from __future__ import annotations

import torch

from models.gpt import GPT, make_condition_tokens


def filter_logits(logits: torch.Tensor, temperature: float | None, top_k: int | None,
                  top_p: float | None) -> torch.Tensor:
    """Scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p   # the most likely token is always kept
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if not temperature:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_tokens(model: GPT, n: int, *, labels: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                  cfg_scale: float = 1.0, temperature: float | None = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  use_kv_cache: bool = True) -> torch.Tensor:
    """(n, tokens_per_image) int64 codes; the first prefix.shape[1] are copied from `prefix` unchanged."""
    config = model.config
    device = model.token_embedding.weight.device
    cond = make_condition_tokens(labels, config.codebook_size, config.n_classes, 0.0, batch_size=n).to(device)
    guided = labels is not None and config.n_classes > 0 and cfg_scale != 1.0
    if guided:   # conditional and unconditional rows in one batch
        cond = torch.cat([cond, torch.full_like(cond, config.start_token)])
    rows = len(cond)
    tokens = torch.zeros(n, config.tokens_per_image, dtype=torch.long, device=device)
    kept = 0 if prefix is None else prefix.shape[1]
    if kept:
        tokens[:, :kept] = prefix.to(device)

    def next_token(last_logits: torch.Tensor) -> torch.Tensor:
        logits = last_logits[:, :config.codebook_size]   # only code ids can be drawn
        if guided:
            conditional, unconditional = logits[:n].float(), logits[n:].float()
            logits = unconditional + cfg_scale * (conditional - unconditional)
        return choose_next(logits, temperature, top_k, top_p, generator)

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(rows // n, *([1] * (t.dim() - 1)))

    was_training = model.training
    model.eval()
    try:
        if use_kv_cache:
            cache = model.new_cache()
            logits, _ = model(torch.cat([cond[:, None], repeat(tokens[:, :kept])], dim=1), cache=cache)
            for position in range(kept, config.tokens_per_image):
                tokens[:, position] = next_token(logits[:, -1])
                if position + 1 < config.tokens_per_image:
                    logits, _ = model(repeat(tokens[:, position:position + 1]), cache=cache)
        else:   # reference: the whole prefix again at every step
            for position in range(kept, config.tokens_per_image):
                logits, _ = model(torch.cat([cond[:, None], repeat(tokens[:, :position])], dim=1))
                tokens[:, position] = next_token(logits[:, -1])
    finally:
        model.train(was_training)
    return tokens
