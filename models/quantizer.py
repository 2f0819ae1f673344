"""The vector quantizer: a latent grid (B, z_channels, h, w) -> code vectors and integer codes.

The nearest codebook vector per position, with the straight-through estimator. Classic VQ, or
l2-normalised codes (cosine lookup) in a low-dimensional lookup space (`codebook_dim` <
`z_channels`, LlamaGen's choice). Codes left unused for `dead_code_steps` optimizer steps are
re-seeded from encoder outputs by `restart_dead_codes`, which the trainer calls after the
optimizer step (never inside the forward, whose graph holds the codebook), identically on every
DDP rank.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def full_fp32_matmul():
    """IEEE fp32 matmuls inside, whatever the trainer chose for the networks (TF32 on CUDA)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32   # the legacy flag, as configure_backends sets it: mixing APIs makes getters raise
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def flatten_positions(latents: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D) fp32 vectors in raster order."""
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()


def usage_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram `counts` (codebook_size,), detached."""
    probs = counts / counts.sum()
    # 0 * log(tiny) = 0 for unused codes; a boolean mask here would cost a host sync per forward
    return torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum()).detach()


class VectorQuantizer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.codebook_dim = config.codebook_dim
        self.normalized = config.quantizer == "l2"
        self.beta = config.beta
        self.taming_loss = config.vq_loss == "taming"
        self.dead_code_steps = config.dead_code_steps
        projected = config.codebook_dim != config.z_channels
        self.project_in = nn.Conv2d(config.z_channels, config.codebook_dim, 1) if projected else nn.Identity()
        self.project_out = nn.Conv2d(config.codebook_dim, config.z_channels, 1) if projected else nn.Identity()
        codebook = torch.empty(config.codebook_size, config.codebook_dim)
        if self.normalized:
            nn.init.normal_(codebook)
        else:
            nn.init.uniform_(codebook, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("steps_unused", torch.zeros(config.codebook_size, dtype=torch.long))
        # what the training forwards since the last optimizer step saw: code counts (summed over the
        # micro-steps) and the latest encoder outputs, the candidates for a restart. Plain attributes, not
        # buffers: DDP would overwrite each rank's own counts with rank 0's before every forward
        self.usage_this_step: torch.Tensor | None = None
        self.restart_candidates: torch.Tensor | None = None

    def lookup_vectors(self) -> torch.Tensor:
        """Codebook in the lookup space, fp32 (normalised for the l2 variant)."""
        codes = self.codebook.float()
        return F.normalize(codes, dim=1) if self.normalized else codes

    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||flat - e_k||^2 for (N, D) fp32 vectors -> (N,) int64."""
        codes = self.lookup_vectors()
        with full_fp32_matmul():   # TF32 (on for the networks) would round the products to 10 bits
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(dim=1)

    def _lookup_space(self, z_lookup: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) projected latents -> (B*h*w, D) fp32 vectors, normalised for the l2 variant."""
        flat = flatten_positions(z_lookup)
        return F.normalize(flat, dim=1) if self.normalized else flat

    @torch.no_grad()
    def indices_for(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_channels, h, w) -> codes (B, h, w) int64, the ones forward() picks; no statistics."""
        z_lookup = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            indices = self.nearest_codes(self._lookup_space(z_lookup))
        return indices.view(z_lookup.shape[0], *z_lookup.shape[2:])

    def forward(self, z: torch.Tensor):
        """z (B, z_channels, h, w) -> z_q (same shape), loss, indices (B, h, w), stats."""
        z_lookup = self.project_in(z)
        batch, dim, height, width = z_lookup.shape
        # fp32 and no autocast: under bf16 nearby distances tie or swap and argmin picks wrong codes
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._lookup_space(z_lookup)
            indices = self.nearest_codes(flat)
            quantized = self.lookup_vectors()[indices]
            commitment = F.mse_loss(flat, quantized.detach())   # pulls the encoder towards its codes
            if self.taming_loss:   # taming's released models (legacy=True): beta on the codebook term
                loss = commitment + self.beta * F.mse_loss(quantized, flat.detach())
            else:                  # VQ-VAE (van den Oord et al.): beta on the commitment term
                loss = F.mse_loss(quantized, flat.detach()) + self.beta * commitment
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            if self.training and self.dead_code_steps > 0:
                self.usage_this_step = counts if self.usage_this_step is None else self.usage_this_step + counts
                self.restart_candidates = flatten_positions(z_lookup.detach())
            if flat.requires_grad:   # straight-through estimator; without a graph keep the exact code vectors
                quantized = flat + (quantized - flat).detach()
        z_q = quantized.view(batch, height, width, dim).permute(0, 3, 1, 2).to(z_lookup.dtype)
        stats = {"perplexity": usage_perplexity(counts)}
        return self.project_out(z_q), loss, indices.view(batch, height, width), stats

    def indices_to_embedding(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> z_q (B, z_channels, h, w), the vectors the forward pass uses."""
        quantized = self.lookup_vectors()[indices]              # (B, h, w, D)
        return self.project_out(quantized.permute(0, 3, 1, 2).to(self.codebook.dtype))

    def discard_step_usage(self) -> None:
        """Forget what the forwards of a skipped step saw: it ages no code."""
        self.usage_this_step = self.restart_candidates = None

    @torch.no_grad()
    def restart_dead_codes(self) -> torch.Tensor:
        """After an optimizer step: age the codes the step's forwards did not use and re-seed those unused for
        `dead_code_steps` steps with encoder outputs of the last micro-batch (rank 0's, on every rank).
        Returns the restarted rows (the caller resets their optimizer moments); a collective under DDP."""
        usage, candidates = self.usage_this_step, self.restart_candidates
        self.discard_step_usage()
        none = torch.zeros(0, dtype=torch.long, device=self.codebook.device)
        if usage is None:   # no training forward since the last step (or no restarts configured)
            return none
        if _distributed():
            dist.all_reduce(usage)
        self.steps_unused.add_(1).masked_fill_(usage > 0, 0)
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().flatten()
        if len(dead) == 0:
            return none
        picks = torch.randint(0, len(candidates), (len(dead),), device=candidates.device)
        replacements = candidates[picks].contiguous()
        if _distributed():
            dist.broadcast(replacements, src=0)
        if not torch.isfinite(replacements).all():   # same on every rank after the broadcast
            return none
        self.codebook[dead] = replacements.to(self.codebook.dtype)
        self.steps_unused[dead] = 0
        return dead
