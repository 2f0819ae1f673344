"""Quantizers: a latent grid (B, z_channels, h, w) -> code vectors and integer codes.

`VectorQuantizer`: the nearest codebook vector per position. Classic VQ, or l2-normalised codes
(cosine lookup) in a low-dimensional lookup space (`codebook_dim` < `z_channels`, LlamaGen's
choice); EMA codebook updates; restarts of codes left unused for a number of steps, identical on
every DDP rank; the rotation trick instead of the plain straight-through estimator.

`FiniteScalarQuantizer` (FSQ, Mentzer et al. 2023): each of a few channels is bounded and rounded
to one of `levels[i]` values; the code is the mixed-radix number of those digits. No codebook to
learn, so none to collapse, and no auxiliary loss.
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


def rotate_onto(vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): `targets` in the forward pass, while the gradient
    reaches `vectors` through the (constant) rotation and scaling that maps each onto its target,
    so it carries the angle between them instead of being copied unchanged. (N, D) -> (N, D)."""
    norms = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    with torch.no_grad():
        unit_v = vectors / norms
        unit_t = F.normalize(targets, dim=1)
        mirror = F.normalize(unit_v + unit_t, dim=1)
        scale = targets.norm(dim=1, keepdim=True) / norms
    # R v = v - 2 (v.r) r + 2 (v.unit_v) unit_t, with v.unit_v = |v|
    rotated = scale * (vectors - 2 * (vectors * mirror).sum(1, keepdim=True) * mirror + 2 * norms * unit_t)
    return rotated + (targets - rotated).detach()   # the exact code forward, even for a zero vector


class VectorQuantizer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.codebook_dim = config.codebook_dim
        self.normalized = config.quantizer == "l2"
        self.beta = config.beta
        self.taming_loss = config.vq_loss == "taming"
        self.rotation_trick = config.rotation_trick
        self.ema_decay = config.ema_decay
        self.dead_code_steps = config.dead_code_steps
        projected = config.codebook_dim != config.z_channels
        self.project_in = nn.Conv2d(config.z_channels, config.codebook_dim, 1) if projected else nn.Identity()
        self.project_out = nn.Conv2d(config.codebook_dim, config.z_channels, 1) if projected else nn.Identity()
        codebook = torch.empty(config.codebook_size, config.codebook_dim)
        if self.normalized:
            nn.init.normal_(codebook)
        else:
            nn.init.uniform_(codebook, -1.0 / config.codebook_size, 1.0 / config.codebook_size)
        self.codebook = nn.Parameter(codebook, requires_grad=self.ema_decay == 0)
        if self.ema_decay > 0:
            self.register_buffer("ema_cluster_size", torch.ones(config.codebook_size))
            self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(config.codebook_size, dtype=torch.long))
        self.accumulating = False     # set by the trainer on the micro-steps before an optimizer step
        self._usage_this_step = None  # code usage summed over those micro-steps

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
            if self.ema_decay > 0:
                loss = self.beta * commitment
            elif self.taming_loss:   # taming's released models (legacy=True): beta on the codebook term
                loss = commitment + self.beta * F.mse_loss(quantized, flat.detach())
            else:                    # VQ-VAE (van den Oord et al.): beta on the commitment term
                loss = F.mse_loss(quantized, flat.detach()) + self.beta * commitment
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            restarted = counts.new_zeros(())   # a device tensor: logging it costs no host-device copy
            if self.training:
                if self.ema_decay > 0:
                    self._ema_update(flat.detach(), indices, counts)
                if self.dead_code_steps > 0:
                    encoder_vectors = flatten_positions(z_lookup.detach())
                    restarted = restarted + self._restart_dead_codes(encoder_vectors, counts)
            if flat.requires_grad:   # without a graph keep the exact code vectors
                if self.rotation_trick:
                    quantized = rotate_onto(flat, quantized.detach())
                else:                # straight-through estimator
                    quantized = flat + (quantized - flat).detach()
        z_q = quantized.view(batch, height, width, dim).permute(0, 3, 1, 2).to(z_lookup.dtype)
        stats = {"perplexity": usage_perplexity(counts), "restarted": restarted}
        return self.project_out(z_q), loss, indices.view(batch, height, width), stats

    def indices_to_embedding(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> z_q (B, z_channels, h, w), the vectors the forward pass uses."""
        quantized = self.lookup_vectors()[indices]              # (B, h, w, D)
        return self.project_out(quantized.permute(0, 3, 1, 2).to(self.codebook.dtype))

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
        counts = counts.clone()
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        # a non-finite batch (the trainer skips that step) must not poison the codebook; a device-side
        # select, not an `if`, so no host sync per step; every rank sees the same reduced sums
        finite = torch.isfinite(sums).all()
        cluster_size = self.ema_cluster_size * self.ema_decay + counts * (1 - self.ema_decay)
        ema_sum = self.ema_sum * self.ema_decay + sums * (1 - self.ema_decay)
        total = cluster_size.sum()
        # Laplace smoothing keeps never-assigned codes from dividing by zero
        smoothed = (cluster_size + 1e-5) / (total + self.codebook_size * 1e-5) * total
        for state, update in ((self.ema_cluster_size, cluster_size), (self.ema_sum, ema_sum),
                              (self.codebook.data, ema_sum / smoothed.unsqueeze(1))):
            state.copy_(torch.where(finite, update, state))

    @torch.no_grad()
    def _restart_dead_codes(self, encoder_vectors: torch.Tensor, counts: torch.Tensor) -> int:
        """Re-seed codes unused for `dead_code_steps` optimizer steps with current encoder outputs (rank 0's).

        Under gradient accumulation the trainer sets `accumulating` on every micro-step but the
        last: usage is summed over the step's micro-steps and the counter advances once per step.
        """
        # the last entry counts non-finite micro-batches: the trainer skips such a step, so no code ages (a step
        # skipped for another reason, an fp16 overflow or a NaN GAN term, is undone by the trainer)
        usage = torch.cat([counts, (~torch.isfinite(encoder_vectors).all()).float().view(1)])
        if self._usage_this_step is not None:
            usage = usage + self._usage_this_step
        if self.accumulating:
            self._usage_this_step = usage
            return 0
        self._usage_this_step = None
        if _distributed():
            dist.all_reduce(usage)
        used, non_finite = usage[:-1], usage[-1]
        if non_finite > 0:
            return 0
        self.steps_unused.add_(1).masked_fill_(used > 0, 0)
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().flatten()
        if len(dead) == 0:
            return 0
        picks = torch.randint(0, len(encoder_vectors), (len(dead),), device=encoder_vectors.device)
        replacements = encoder_vectors[picks].contiguous()
        if _distributed():
            dist.broadcast(replacements, src=0)
        if not torch.isfinite(replacements).all():   # same on every rank after the broadcast
            return 0
        if self.ema_decay > 0 and self.normalized:   # the EMA averages unit vectors: seed it with one
            replacements = F.normalize(replacements, dim=1)
        self.codebook.data[dead] = replacements.to(self.codebook.dtype)
        if self.ema_decay > 0:
            self.ema_cluster_size[dead] = 1.0
            self.ema_sum[dead] = replacements
        self.steps_unused[dead] = 0
        return int(len(dead))


class FiniteScalarQuantizer(nn.Module):
    """FSQ: project to len(levels) channels, bound each with tanh, round to its grid (straight-through)."""

    def __init__(self, config):
        super().__init__()
        levels = torch.tensor(config.fsq_levels, dtype=torch.long)
        self.codebook_size = int(levels.prod())
        self.codebook_dim = len(levels)
        self.project_in = nn.Conv2d(config.z_channels, self.codebook_dim, 1)
        self.project_out = nn.Conv2d(self.codebook_dim, config.z_channels, 1)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("radix", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0), persistent=False)

    def _digits(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, d) fp32 -> (N, d) integers in [-(L//2), L - 1 - L//2] as floats, straight-through."""
        levels = self.levels.float()
        half_range = (levels - 1) * (1 + 1e-3) / 2          # just over (L-1)/2 so both ends round inwards
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)   # even L: a grid shifted by half a step
        bounded = torch.tanh(flat + torch.atanh(offset / half_range)) * half_range - offset
        return bounded + (bounded.round() - bounded).detach()

    def _codes_from_digits(self, digits: torch.Tensor) -> torch.Tensor:
        return ((digits.detach().round().long() + self.levels // 2) * self.radix).sum(1)

    def _vectors(self, digits: torch.Tensor) -> torch.Tensor:
        return digits / (self.levels // 2).float()          # every channel in [-1, 1]

    @torch.no_grad()
    def indices_for(self, z: torch.Tensor) -> torch.Tensor:
        z_lookup = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flatten_positions(z_lookup)
            indices = self._codes_from_digits(self._digits(flat))
        return indices.view(z_lookup.shape[0], *z_lookup.shape[2:])

    def forward(self, z: torch.Tensor):
        """z (B, z_channels, h, w) -> z_q (same shape), loss (0), indices (B, h, w), stats."""
        z_lookup = self.project_in(z)
        batch, dim, height, width = z_lookup.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flatten_positions(z_lookup)
            digits = self._digits(flat)
            indices = self._codes_from_digits(digits)
            quantized = self._vectors(digits)
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            loss = flat.sum() * 0.0   # no auxiliary loss; a graph-carrying zero keeps the trainer's backward uniform
        z_q = quantized.view(batch, height, width, dim).permute(0, 3, 1, 2).to(z_lookup.dtype)
        stats = {"perplexity": usage_perplexity(counts), "restarted": counts.new_zeros(())}
        return self.project_out(z_q), loss, indices.view(batch, height, width), stats

    def indices_to_embedding(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) -> z_q (B, z_channels, h, w), the vectors the forward pass uses."""
        digits = (indices.unsqueeze(-1) // self.radix) % self.levels - self.levels // 2   # (B, h, w, d)
        quantized = self._vectors(digits.float())
        return self.project_out(quantized.permute(0, 3, 1, 2).to(self.project_out.weight.dtype))


def build_quantizer(config) -> nn.Module:
    return FiniteScalarQuantizer(config) if config.quantizer == "fsq" else VectorQuantizer(config)
