"""A decoder-only transformer over VQGAN token grids, with a KV cache for sampling.

Ids 0..codebook_size-1 are codes; codebook_size + c is class c; codebook_size + n_classes is the
start token (also the "no class" token of label dropout). Conditioning ids never collide with
code 0, and the sampler masks them out of every prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    codebook_size: int = 1024
    n_classes: int = 0
    tokens_per_image: int = 256
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = False
    label_dropout: float = 0.1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if min(self.codebook_size, self.tokens_per_image, self.n_layer, self.n_head) < 1 or self.n_classes < 0:
            raise ValueError("codebook_size, tokens_per_image, n_layer and n_head must be positive")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.n_classes + 1

    @property
    def start_token(self) -> int:
        return self.codebook_size + self.n_classes


GPT_PRESETS = {
    "tiny": GPTConfig(codebook_size=256, tokens_per_image=64, n_layer=4, n_head=4, n_embd=128),
    "g256": GPTConfig(codebook_size=1024, tokens_per_image=256, n_layer=8, n_head=8, n_embd=512),
    "seed": GPTConfig(codebook_size=1024, tokens_per_image=256, n_layer=12, n_head=12, n_embd=768),
}


def make_condition_tokens(labels: torch.Tensor | None, codebook_size: int, n_classes: int, drop_prob: float,
                          generator: torch.Generator | None = None, batch_size: int | None = None) -> torch.Tensor:
    """(B,) first tokens: class tokens, each replaced by the start token with probability drop_prob."""
    start = codebook_size + n_classes
    if labels is None or n_classes == 0:
        return torch.full((batch_size if labels is None else len(labels),), start, dtype=torch.long)
    cond = labels.long() + codebook_size
    if drop_prob > 0:
        dropped = torch.rand(len(labels), generator=generator, device=labels.device) < drop_prob
        cond = torch.where(dropped, torch.full_like(cond, start), cond)
    return cond


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding."""

    def __init__(self, config: GPTConfig):
        self.n_layer = config.n_layer
        self.max_length = config.tokens_per_image
        self.tensors: torch.Tensor | None = None
        self.length = 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) new keys/values at the current length; return all keys/values so far."""
        if self.tensors is None:   # allocated at first use, in the dtype autocast computes keys in
            batch, heads, _, head_dim = keys.shape
            self.tensors = keys.new_empty((self.n_layer, 2, batch, heads, self.max_length, head_dim))
        end = self.length + keys.shape[2]
        self.tensors[layer, 0, :, :, self.length:end] = keys
        self.tensors[layer, 1, :, :, self.length:end] = values
        return self.tensors[layer, 0, :, :, :end], self.tensors[layer, 1, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_index = layer_index
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            start = cache.length
            k, v = cache.append(self.layer_index, k, v)
            if length == 1:   # one new query sees the whole cached prefix: no mask needed
                out = F.scaled_dot_product_attention(q, k, v)
            else:             # prefill: new query i sees cached positions and new positions <= i
                mask = torch.ones(length, start + length, dtype=torch.bool, device=x.device).tril(diagonal=start)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
                                 nn.Dropout(config.dropout))

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
        self.head.weight = self.token_embedding.weight   # weight tying
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                # residual projections scaled so the residual stream's variance does not grow with depth
                nn.init.normal_(parameter, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy when targets are given.

        With a cache, idx holds only the new positions; they start at `cache.length`.
        """
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.length += idx.shape[1]
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW: matrices and embeddings decay; biases and LayerNorm gains do not."""
        parameters = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in parameters.values() if p.dim() >= 2]
        no_decay = [p for p in parameters.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus the attention score/value matmuls."""
        config = self.config
        non_embedding = self.num_params() - self.position_embedding.weight.numel()
        attention = 12 * config.n_layer * config.n_embd * config.tokens_per_image
        return 6 * non_embedding + attention
