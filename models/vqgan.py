"""The VQGAN autoencoder: encoder -> vector quantizer -> decoder, with its config and presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.decoder import Decoder
from models.encoder import Encoder
from models.quantizer import VectorQuantizer

QUANTIZERS = ("vq", "l2")
VQ_LOSSES = ("vqvae", "taming")


def most_disc_layers(image_size: int) -> int:
    """The most layers of a PatchGAN on this image side: it halves the image once per layer, then two 4x4
    convolutions each take a pixel off, and at least one logit must be left."""
    return max(0, (image_size // 3).bit_length() - 1)


@dataclass(frozen=True)
class VQGANConfig:
    image_size: int = 64
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8,)
    z_channels: int = 64
    dropout: float = 0.0
    codebook_size: int = 1024
    codebook_dim: int = 64
    quantizer: str = "vq"         # vq | l2 (normalised, low-dim lookup)
    beta: float = 0.25
    vq_loss: str = "vqvae"        # vqvae: beta weighs the commitment term; taming: beta weighs the codebook term
    dead_code_steps: int = 0
    # quant_conv / post_quant_conv map z_channels <-> codebook_dim themselves (taming's and LlamaGen's layout)
    # instead of the quantizer's project_in / project_out
    quant_conv_to_codebook: bool = False
    disc_layers: int = 3
    disc_ndf: int = 64
    # every encoder level after the first also sees the image average-pooled to its own grid (1x1 conv, added):
    # colour sits in thin strokes and small fills that the strided convolutions lose on the way down
    pooled_input: bool = False

    def __post_init__(self):
        # every value a network cannot be built from (or would build wrong) is refused here, in one line
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be one or more positive multipliers, got {self.ch_mult}")
        if min(self.ch, self.z_channels, self.codebook_size, self.codebook_dim, self.num_res_blocks, self.disc_ndf) < 1:
            raise ValueError("ch, z_channels, codebook_size, codebook_dim, num_res_blocks and disc_ndf must be positive")
        factor = self.downsample_factor
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of {factor} "
                             "(2**(len(ch_mult)-1))")
        widths = sorted({self.ch, *(self.ch * multiplier for multiplier in self.ch_mult)})
        if any(width > 32 and width % 32 for width in widths):   # group_norm: min(32, channels) groups
            raise ValueError(f"ch {self.ch} x ch_mult {self.ch_mult} gives levels of {widths} channels; GroupNorm "
                             "splits each into 32 groups: every width must be at most 32 or a multiple of 32")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ValueError(f"beta must not be negative, got {self.beta}")
        if not 0 <= self.disc_layers <= most_disc_layers(self.image_size):
            raise ValueError(f"disc_layers {self.disc_layers}: a {self.image_size} px image fits a PatchGAN of 0 to "
                             f"{most_disc_layers(self.image_size)} layers")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.vq_loss not in VQ_LOSSES:
            raise ValueError(f"vq_loss must be one of {VQ_LOSSES}, got {self.vq_loss!r}")
        if self.dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must not be negative, got {self.dead_code_steps}")
        grids = [self.image_size >> level for level in range(len(self.ch_mult))]
        if not set(self.attn_resolutions) <= set(grids):   # attention at a grid no level has would be silently absent
            raise ValueError(f"attn_resolutions {self.attn_resolutions}: the levels' grids are {grids}; pass "
                             f"--attn-resolutions {grids[-1]} for attention at the bottleneck")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        latent = config.codebook_dim if config.quant_conv_to_codebook else config.z_channels
        self.quant_conv = nn.Conv2d(config.z_channels, latent, 1)
        self.quantizer = VectorQuantizer(dataclasses.replace(config, z_channels=latent))
        self.post_quant_conv = nn.Conv2d(latent, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.downsample_factor
        return side, side

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer

    def hidden_weights(self) -> list[nn.Parameter]:
        """The weight matrices / filters between the layer that reads pixels and the one that writes them,
        without the codebook: what Muon orthogonalises (vqgpt/optim.py)."""
        left_out = {id(self.encoder.conv_in.weight), id(self.decoder.conv_out.weight),
                    id(self.quantizer.codebook),
                    *(id(conv.weight) for conv in self.encoder.pooled_in)}
        return [p for p in self.parameters() if p.ndim >= 2 and id(p) not in left_out]

    def encode(self, images: torch.Tensor):
        """images in [-1, 1] (B, 3, H, W) -> z_q, quantizer loss, indices (B, h, w), stats."""
        return self.quantizer(self.quant_conv(self.encoder(images)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor):
        z_q, quant_loss, indices, stats = self.encode(images)
        return self.decode(z_q), quant_loss, indices, stats

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h*w) int64 codes in raster order; no decoder, no graph."""
        return self.quantizer.indices_for(self.quant_conv(self.encoder(images))).flatten(1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h*w) codes -> images (B, 3, H, W) in about [-1, 1]."""
        height, width = self.latent_grid
        return self.decode(self.quantizer.indices_to_embedding(indices.view(-1, height, width)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_F16 = dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256)
# Ours: l2-normalised 8-d codes with dead-code restarts (LlamaGen's lookup), which keeps the codebook
# alive on real images (bench/quality.py). taming-*: taming-transformers' quantizer (plain VQ with 256-d
# or 64-d codes, uniform init, beta on the codebook term) on its released f16 networks, and on our 64 px
# network as taming-b64; for reproduction and imports. b64 restarts a code after 10 unused steps, not 20: under
# Muon the photographs' val codes used went from 83% to 98% / 95% on the two low seeds (BENCHMARKS runs 83-84).
# b64 takes the pooled input: without it the drawings' hue is gone by the encoder's 8 px level (a linear probe
# explains none of it there) and they come back grey or in the training palette (BENCHMARKS runs 97-106).
VQGAN_PRESETS = {
    "tiny": VQGANConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                        z_channels=32, codebook_size=256, codebook_dim=8, quantizer="l2", dead_code_steps=20,
                        disc_layers=2, disc_ndf=32),
    "b64": VQGANConfig(image_size=64, ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(8,),
                       z_channels=64, codebook_size=1024, codebook_dim=8, quantizer="l2", dead_code_steps=10,
                       pooled_input=True, disc_layers=3, disc_ndf=64),
    "seed": VQGANConfig(**_F16, codebook_size=8192, codebook_dim=8, quantizer="l2", dead_code_steps=20),
    "f16-16384": VQGANConfig(**_F16, codebook_size=16384, codebook_dim=8, quantizer="l2", dead_code_steps=20),
    "taming-b64": VQGANConfig(image_size=64, ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(8,),
                              z_channels=64, codebook_size=1024, codebook_dim=64, quantizer="vq", vq_loss="taming"),
    "taming-f16-1024": VQGANConfig(**_F16, codebook_size=1024, codebook_dim=256, quantizer="vq", vq_loss="taming"),
    "taming-f16-16384": VQGANConfig(**_F16, codebook_size=16384, codebook_dim=256, quantizer="vq", vq_loss="taming",
                                    disc_layers=2),
}
