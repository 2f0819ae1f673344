"""A decoder-only transformer over VQGAN token grids, with a KV cache for sampling.

Token ids: 0..codebook_size-1 are codes, codebook_size + c is class c, and
codebook_size + n_classes is the start token (also the "no class" token of label dropout).
An image with tokens t0..t_{L-1} is read as [cond, t0, ..., t_{L-2}] and predicts [t0, ..., t_{L-1}],
where cond is its class token or the start token. Conditioning ids never collide with a code, and
the sampler never draws them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    codebook_size: int = 1024
    n_classes: int = 0
    tokens_per_image: int = 256   # block size: one position embedding per token of the grid
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = False
    label_dropout: float = 0.1   # training only: chance a class token is replaced by the start token

    min_codebook_size: ClassVar[int] = 1   # the trainer's config allows 0: "take it from the tokens"

    def __post_init__(self):
        for name in ("tokens_per_image", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.codebook_size < self.min_codebook_size:
            raise ValueError(f"codebook_size must be at least {self.min_codebook_size}, got {self.codebook_size}")
        if self.n_classes < 0:
            raise ValueError(f"GPTConfig.n_classes must be >= 0, got {self.n_classes}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"GPTConfig.label_dropout must be in [0, 1], got {self.label_dropout}")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.n_classes + 1

    @property
    def start_token(self) -> int:
        return self.codebook_size + self.n_classes


# The trainer replaces codebook_size, n_classes and tokens_per_image with the token manifest's;
# the codebook sizes here are those of the VQGAN presets of the same name.
GPT_PRESETS = {
    "tiny": GPTConfig(codebook_size=256, tokens_per_image=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1),
    "g256": GPTConfig(codebook_size=1024, tokens_per_image=256, n_layer=8, n_head=8, n_embd=512),
    "seed": GPTConfig(codebook_size=8192, tokens_per_image=256, n_layer=12, n_head=12, n_embd=768),
}


def make_condition_tokens(labels: torch.Tensor | None, codebook_size: int, n_classes: int, drop_prob: float,
                          generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
    """(B,) int64 first tokens: class tokens, each replaced by the start token with probability drop_prob.

    Without labels (or without classes) every row gets the start token; batch_size says how many.
    """
    start = codebook_size + n_classes
    if labels is None or n_classes == 0:
        if batch_size is None:
            batch_size = len(labels)
        device = None if labels is None else labels.device
        return torch.full((batch_size,), start, dtype=torch.long, device=device)
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min().item()}..{labels.max().item()}")
    cond = labels + codebook_size
    if drop_prob > 0:
        # drawn on the generator's device so a seeded CPU generator works for labels anywhere
        gen_device = generator.device if generator is not None else labels.device
        dropped = (torch.rand(len(labels), generator=generator, device=gen_device) < drop_prob).to(labels.device)
        cond = cond.masked_fill(dropped, start)
    return cond


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for a whole image.

    `kv` is (n_layer, 2, B, n_head, max_length, head_dim); the first `length` positions are filled.
    It is allocated by the first forward, which knows the batch size, device and (autocast) dtype.
    """

    def __init__(self, n_layer: int, max_length: int):
        self.n_layer = n_layer
        self.max_length = max_length
        self.kv: torch.Tensor | None = None
        self.length = 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values after the filled positions; return this layer's keys/values so far."""
        if self.kv is None:
            batch, n_head, _, head_dim = keys.shape
            self.kv = keys.new_empty((self.n_layer, 2, batch, n_head, self.max_length, head_dim))
        end = self.length + keys.shape[2]
        self.kv[layer, 0, :, :, self.length:end] = keys
        self.kv[layer, 1, :, :, self.length:end] = values
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_index = layer_index   # which slot of the KV cache is ours
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        else:
            past = cache.length
            k, v = cache.append(self.layer_index, k, v)
            if length == 1:
                # one new query may see every cached position: no mask needed
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                # several new queries: query i sees the past and new positions <= i (is_causal would
                # align the triangle to the top-left corner, wrong once the cache is non-empty)
                mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.residual_dropout(self.proj(out))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.tokens_per_image, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight   # weight tying: one matrix, one storage

        self.apply(self._init_weights)
        residual_projection = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            # the residual stream adds 2 projections per layer; scaled so its variance does not grow with depth
            nn.init.normal_(block.attn.proj.weight, 0.0, residual_projection)
            nn.init.normal_(block.mlp[2].weight, 0.0, residual_projection)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters counted once (the tied head adds none)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.tokens_per_image)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) int64 -> logits (B, T, vocab_size), and the mean cross-entropy when targets are given.

        With a cache, idx holds only the new positions, which start at cache.length; their keys and
        values are appended and only their logits computed.
        """
        start = 0 if cache is None else cache.length
        length = idx.shape[1]
        if start + length > self.config.tokens_per_image:
            raise ValueError(f"positions {start}..{start + length - 1} exceed tokens_per_image "
                             f"{self.config.tokens_per_image}")
        positions = torch.arange(start, start + length, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.length += length
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            # fp32: cross-entropy over ~1k logits under bf16 loses the small probabilities
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW: matrices and embeddings decay; biases and LayerNorm gains (all 1-D) do not."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in parameters if p.dim() >= 2]
        no_decay = [p for p in parameters if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in nanoGPT / the PaLM appendix:
        6 per weight (position embeddings are a lookup, not a matmul) plus the attention
        score and value matmuls over a full context of tokens_per_image."""
        config = self.config
        matmul_params = self.num_params() - self.position_embedding.weight.numel()
        attention = 12 * config.n_layer * config.n_embd * config.tokens_per_image
        return 6 * matmul_params + attention
