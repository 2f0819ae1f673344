"""Sampling token grids from the GPT: KV cache, temperature, top-k, top-p, classifier-free guidance.

Ids above the codebook (class and start tokens) get -inf logits before every draw, so they can
never be sampled and nothing is resampled in a loop. Each position costs exactly one
torch.multinomial call on the (n, vocab) guided probabilities, whichever path computed the logits,
so a seeded generator gives the same tokens with and without the KV cache.
"""
from __future__ import annotations

import torch

from models.gpt import GPT, make_condition_tokens


def filter_logits(logits: torch.Tensor, temperature: float | None = 1.0, top_k: int | None = None,
                  top_p: float | None = None, num_valid: int | None = None) -> torch.Tensor:
    """(B, V) logits -> fp32 logits scaled by 1/temperature, everything that may not be drawn at -inf.

    num_valid: ids >= num_valid are masked (for the GPT: everything above the codebook).
    top_k: keep the k largest. top_p: keep the smallest set of most likely ids whose probability
    adds up to at least top_p; the most likely id is always kept. temperature 0 or None: no scaling.
    The largest allowed logit comes back as 0 and every other below it, so softmax never meets inf.
    """
    logits = logits.double()   # until scaled: 1 / temperature (1e-45) and a guided logit can overflow fp32
    vocab = logits.shape[-1]
    if num_valid is not None and num_valid < vocab:
        invalid = torch.arange(vocab, device=logits.device) >= num_valid
        logits = logits.masked_fill(invalid, float("-inf"))
    logits = logits - logits.amax(dim=-1, keepdim=True)   # the most likely at 0 / temperature = 0, never inf - inf
    if temperature:
        logits = logits / temperature
    logits = logits.float()
    if top_k is not None and top_k < vocab:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs   # 0 for the most likely id
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False   # a top_p below fp32's smallest number compares as 0: keep the most likely
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


CFG_SCHEDULES = ("constant", "linear")


def guidance_scale(cfg_scale: float, position: int, length: int, schedule: str = "constant",
                   interval: int = 0) -> float:
    """The guidance scale at token `position` (0-based) of a grid of `length` tokens.

    constant: cfg_scale at every position. linear: 1 + (cfg_scale - 1) * position / (length - 1), rising from
    1 at the first token to cfg_scale at the last (MUSE's / LlamaGen's linear schedule).
    interval K > 0: only the first K tokens are guided, the rest take scale 1 (LlamaGen's cfg_interval K is K + 2 here).
    """
    if interval and position >= interval:
        return 1.0
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * position / max(length - 1, 1)
    return cfg_scale


def _check_options(model: GPT, n: int, labels, prefix, temperature, top_k, top_p) -> None:
    config = model.config
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 or None: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if labels is not None:
        if config.n_classes == 0:
            raise ValueError("labels given, but the model was trained without classes (n_classes=0)")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= config.n_classes:
            raise ValueError(f"labels must lie in [0, {config.n_classes})")
    if prefix is not None:
        if prefix.dim() != 2 or prefix.shape[0] != n or prefix.shape[1] > config.tokens_per_image:
            raise ValueError(f"prefix must be (n={n}, k <= {config.tokens_per_image}) codes, got {tuple(prefix.shape)}")
        if prefix.numel() and (prefix.min() < 0 or prefix.max() >= config.codebook_size):
            raise ValueError(f"prefix codes must lie in [0, {config.codebook_size})")


@torch.no_grad()
def sample_tokens(model: GPT, n: int, *, labels: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                  cfg_scale: float = 1.0, temperature: float | None = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  use_kv_cache: bool = True, cfg_schedule: str = "constant", cfg_interval: int = 0) -> torch.Tensor:
    """(n, tokens_per_image) int64 codes.

    labels: (n,) class ids, or None for unconditional samples (start token).
    prefix: (n, k) codes kept from real images; they are copied unchanged and the rest is sampled.
    cfg_scale: classifier-free guidance, uncond + cfg_scale * (cond - uncond); only with labels,
        and 1.0 is plain conditional sampling (no unconditional rows are run at all).
    cfg_schedule, cfg_interval: how the scale varies over the grid (see guidance_scale).
    temperature 0 or None: greedy argmax (top_k / top_p then change nothing).
    generator: drives torch.multinomial; must live on the model's device.
    use_kv_cache=False recomputes the whole sequence at every step (the slow reference).
    """
    _check_options(model, n, labels, prefix, temperature, top_k, top_p)
    if cfg_schedule not in CFG_SCHEDULES or cfg_interval < 0:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES} and cfg_interval >= 0, "
                         f"got {cfg_schedule!r}, {cfg_interval}")
    config = model.config
    device = next(model.parameters()).device
    greedy = not temperature
    guided = labels is not None and cfg_scale != 1.0

    cond = make_condition_tokens(None if labels is None else labels.to(device), config.codebook_size,
                                 config.n_classes, 0.0, batch_size=n).to(device)
    if guided:   # rows n..2n-1 are the same images without their class
        cond = torch.cat([cond, torch.full_like(cond, config.start_token)])

    def model_rows(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, tokens]) if guided else tokens

    def next_tokens(last_logits: torch.Tensor, position: int) -> torch.Tensor:   # (rows, vocab) -> (n,)
        logits = last_logits.float()
        if guided:   # before masking: -inf - -inf would be nan; in fp64: a large scale overflows fp32
            conditional, unconditional = logits.double().chunk(2)
            scale = guidance_scale(cfg_scale, position, config.tokens_per_image, cfg_schedule, cfg_interval)
            logits = conditional if scale == 1.0 else unconditional + scale * (conditional - unconditional)
        if greedy:
            return filter_logits(logits, None, None, None, config.codebook_size).argmax(dim=-1)
        probs = filter_logits(logits, temperature, top_k, top_p, config.codebook_size).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    length = config.tokens_per_image
    tokens = torch.zeros(n, length, dtype=torch.long, device=device)
    kept = 0 if prefix is None else prefix.shape[1]
    if kept:
        tokens[:, :kept] = prefix.to(device=device, dtype=torch.long)
    if kept == length:
        return tokens

    was_training = model.training
    model.eval()
    try:
        if use_kv_cache:
            cache = model.new_cache()
            # prefill: the condition token and every kept code in one pass
            logits, _ = model(torch.cat([cond[:, None], model_rows(tokens[:, :kept])], dim=1), cache=cache)
            for position in range(kept, length):
                tokens[:, position] = next_tokens(logits[:, -1], position)
                if position + 1 < length:
                    logits, _ = model(model_rows(tokens[:, position:position + 1]), cache=cache)
        else:
            for position in range(kept, length):
                logits, _ = model(torch.cat([cond[:, None], model_rows(tokens[:, :position])], dim=1))
                tokens[:, position] = next_tokens(logits[:, -1], position)
    finally:
        model.train(was_training)
    return tokens
