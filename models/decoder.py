"""ResNet decoder: latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import AttnBlock, ResnetBlock, Upsample, group_norm


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels = config.ch * config.ch_mult[-1]
        resolution = config.image_size // 2 ** (len(config.ch_mult) - 1)
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(channels, channels, config.dropout), AttnBlock(channels),
                                 ResnetBlock(channels, channels, config.dropout))
        levels = []
        for level in reversed(range(len(config.ch_mult))):
            out_channels = config.ch * config.ch_mult[level]
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, out_channels, config.dropout))
                channels = out_channels
                if resolution in config.attn_resolutions:
                    blocks.append(AttnBlock(out_channels))
            stage = nn.Module()
            stage.blocks = blocks
            stage.upsample = Upsample(out_channels) if level > 0 else nn.Identity()
            levels.append(stage)
            if level > 0:
                resolution *= 2
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is measured on."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.levels:
            for block in stage.blocks:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
