"""A decoder-only transformer over VQGAN token grids, with a KV cache for sampling.

Two blocks (`arch`): gpt2 (LayerNorm, GELU MLP, learned positions, head tied to the embedding) and
llama, LlamaGen's (RMSNorm, SwiGLU, 2-D rotary positions over the token grid, a separate head over
the codes only); grouped key/value heads, QK-norm, token dropout and drop-path go with either.

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
    arch: str = "gpt2"           # gpt2 or llama (see the module docstring)
    n_kv_head: int = 0           # key/value heads, each shared by n_head // n_kv_head query heads (0: n_head)
    qk_norm: bool = False        # RMSNorm on each head's queries and keys
    token_dropout: float | None = None   # training only: dropout of the input embeddings (None: dropout)
    drop_path: float = 0.0       # training only: chance a block's branch is skipped, rising to this at the last layer

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
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"GPTConfig.arch must be gpt2 or llama, got {self.arch!r}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (0: n_head)")
        for name in ("token_dropout", "drop_path"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {value}")
        if self.arch == "llama" and (math.isqrt(self.tokens_per_image) ** 2 != self.tokens_per_image
                                     or (self.n_embd // self.n_head) % 4):
            raise ValueError(f"arch llama rotates over a square grid in pairs per axis: tokens_per_image "
                             f"({self.tokens_per_image}) must be a square and the head width "
                             f"({self.n_embd // self.n_head}) a multiple of 4")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.n_classes + 1

    @property
    def start_token(self) -> int:
        return self.codebook_size + self.n_classes

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.arch == "gpt2":
            return 4 * self.n_embd
        # LlamaGen's SwiGLU width: two thirds of 4x (three matrices instead of two), rounded up to 256
        return -(-int(2 * 4 * self.n_embd / 3) // 256) * 256


# The trainer replaces codebook_size, n_classes and tokens_per_image with the token manifest's;
# the codebook sizes here are those of the VQGAN presets of the same name.
GPT_PRESETS = {
    "tiny": GPTConfig(codebook_size=256, tokens_per_image=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1),
    "g256": GPTConfig(codebook_size=1024, tokens_per_image=256, n_layer=8, n_head=8, n_embd=512),
    "seed": GPTConfig(codebook_size=8192, tokens_per_image=256, n_layer=12, n_head=12, n_embd=768),
    # LlamaGen's class-conditional GPTs (ImageNet, VQ-16 codes at 256 px) with its dropouts
    "llamagen-B": GPTConfig(codebook_size=16384, n_classes=1000, tokens_per_image=256, n_layer=12, n_head=12,
                            n_embd=768, dropout=0.1, arch="llama"),
    "llamagen-L": GPTConfig(codebook_size=16384, n_classes=1000, tokens_per_image=256, n_layer=24, n_head=16,
                            n_embd=1024, dropout=0.1, arch="llama"),
    "llamagen-XL": GPTConfig(codebook_size=16384, n_classes=1000, tokens_per_image=256, n_layer=36, n_head=20,
                             n_embd=1280, dropout=0.1, arch="llama"),
    "llamagen-XXL": GPTConfig(codebook_size=16384, n_classes=1000, tokens_per_image=256, n_layer=48, n_head=24,
                              n_embd=1536, dropout=0.1, arch="llama"),
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

    `kv` is (n_layer, 2, B, kv_heads, max_length, head_dim); the first `length` positions are filled.
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


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in fp32 (LlamaGen's, eps 1e-5)."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def grid_rotations(side: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(1 + side*side, head_dim/2, 2) cos and sin of the rotary angle of each position and channel pair.

    Position 0 is the condition token: all zeros, so its queries and keys are zeroed, as LlamaGen's
    (every key scores 0 against it, its value still counts). Position 1 + r*side + c is grid cell
    (r, c): the first half of the pairs turn with the row, the second half with the column.
    """
    quarter = head_dim // 4
    frequencies = base ** -(torch.arange(quarter).float() * 2 / (head_dim // 2))
    along = torch.arange(side).float()[:, None] * frequencies             # (side, quarter)
    angles = torch.cat([along[:, None].expand(side, side, quarter),       # row
                        along[None, :].expand(side, side, quarter)], -1)  # column
    table = torch.stack([angles.cos(), angles.sin()], -1).flatten(0, 1)
    return torch.cat([table.new_zeros(1, 2 * quarter, 2), table])


def rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) queries or keys, channels (2i, 2i+1) turned by rotations (T, D/2, 2) in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rotations[..., 0], rotations[..., 1]
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return turned.flatten(-2).type_as(x)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """A residual branch kept for each sample with probability 1 - p (and scaled up by 1 / (1 - p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.layer_index = layer_index   # which slot of the KV cache is ours
        # queries of every head, then keys and values of the key/value heads
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout if config.arch == "gpt2" else 0.0   # LlamaGen drops no attention weights
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rotations: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([width, kv_width, kv_width], dim=-1)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim)
        q, k, v = (t.view(batch, length, heads, self.head_dim).transpose(1, 2)
                   for t, heads in ((q, self.n_head), (k, self.n_kv_head), (v, self.n_kv_head)))
        q, k = self.q_norm(q), self.k_norm(k)
        if rotations is not None:
            q, k = rotate(q, rotations), rotate(k, rotations)
        past = 0
        if cache is not None:   # the cache keeps the key/value heads only
            past = cache.length
            k, v = cache.append(self.layer_index, k, v)
        if self.n_kv_head != self.n_head:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        elif length == 1:
            # one new query may see every cached position: no mask needed
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # several new queries: query i sees the past and new positions <= i (is_causal would
            # align the triangle to the top-left corner, wrong once the cache is non-empty)
            mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.residual_dropout(self.proj(out))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int, drop_path: float = 0.0):
        super().__init__()
        llama = config.arch == "llama"
        self.ln_1 = RMSNorm(config.n_embd) if llama else nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = RMSNorm(config.n_embd) if llama else nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = SwiGLU(config) if llama else nn.Sequential(
            nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias),
            nn.GELU(),
            nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias),
            nn.Dropout(config.dropout),
        )
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rotations: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.ln_1(x), cache, rotations), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path, self.training)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        llama = config.arch == "llama"
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        if llama:   # not saved: rebuilt from the config
            side = math.isqrt(config.tokens_per_image)
            rotations = grid_rotations(side, config.n_embd // config.n_head)[:config.tokens_per_image]
            self.register_buffer("rotations", rotations, persistent=False)
        else:
            self.position_embedding = nn.Embedding(config.tokens_per_image, config.n_embd)
        self.dropout = nn.Dropout(config.dropout if config.token_dropout is None else config.token_dropout)
        rates = [config.drop_path * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]   # LlamaGen's ramp
        self.blocks = nn.ModuleList(Block(config, i, rates[i]) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd) if llama else nn.LayerNorm(config.n_embd, bias=config.bias)
        # gpt2: logits over the whole vocabulary, tied; llama: over the codes only, its own matrix
        self.head = nn.Linear(config.n_embd, config.codebook_size if llama else config.vocab_size, bias=False)
        if not llama:
            self.head.weight = self.token_embedding.weight   # weight tying: one matrix, one storage

        self.apply(self._init_weights)
        if llama:   # LlamaGen's: the head starts at zero, every first prediction is uniform
            nn.init.zeros_(self.head.weight)
        else:
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
        """Parameters counted once (gpt2's tied head adds none)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.tokens_per_image)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) int64 -> logits (B, T, V), and the mean cross-entropy when targets are given.

        V is vocab_size for gpt2 and codebook_size for llama: only codes are ever predicted.

        With a cache, idx holds only the new positions, which start at cache.length; their keys and
        values are appended and only their logits computed.
        """
        start = 0 if cache is None else cache.length
        length = idx.shape[1]
        if start + length > self.config.tokens_per_image:
            raise ValueError(f"positions {start}..{start + length - 1} exceed tokens_per_image "
                             f"{self.config.tokens_per_image}")
        x = self.token_embedding(idx)
        rotations = None
        if self.config.arch == "llama":
            rotations = self.rotations[start:start + length]
        else:
            x = x + self.position_embedding(torch.arange(start, start + length, device=idx.device))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, cache, rotations)
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
        6 per weight (embeddings are a lookup, not a matmul; gpt2's is also the head) plus the
        attention score and value matmuls over a full context of tokens_per_image."""
        config = self.config
        lookup = self.token_embedding if config.arch == "llama" else self.position_embedding
        matmul_params = self.num_params() - lookup.weight.numel()
        attention = 12 * config.n_layer * config.n_embd * config.tokens_per_image
        return 6 * matmul_params + attention
