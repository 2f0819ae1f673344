"""ResNet encoder: image (B, 3, H, W) -> latent (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import AttnBlock, Downsample, ResnetBlock, group_norm


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.conv_in = nn.Conv2d(3, config.ch, 3, padding=1)
        levels = []
        resolution = config.image_size
        in_channels = config.ch
        for level, multiplier in enumerate(config.ch_mult):
            out_channels = config.ch * multiplier
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(in_channels, out_channels, config.dropout))
                in_channels = out_channels
                if resolution in config.attn_resolutions:
                    blocks.append(AttnBlock(out_channels))
            stage = nn.Module()
            stage.blocks = blocks
            stage.downsample = Downsample(out_channels) if level < len(config.ch_mult) - 1 else nn.Identity()
            levels.append(stage)
            if level < len(config.ch_mult) - 1:
                resolution //= 2
        self.levels = nn.ModuleList(levels)
        # config.pooled_input: the output of each level (the input of the next, or of the middle) also gets the
        # image average-pooled to its grid through a 1x1 conv; the last level does not downsample
        last = len(config.ch_mult) - 1
        self.pooled_factors = [2 ** min(level + 1, last) for level in range(len(config.ch_mult))]
        self.pooled_in = nn.ModuleList(nn.Conv2d(3, config.ch * multiplier, 1) for multiplier in config.ch_mult) \
            if config.pooled_input else nn.ModuleList()
        self.mid = nn.Sequential(ResnetBlock(in_channels, in_channels, config.dropout), AttnBlock(in_channels),
                                 ResnetBlock(in_channels, in_channels, config.dropout))
        self.norm_out = group_norm(in_channels)
        self.conv_out = nn.Conv2d(in_channels, config.z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for level, stage in enumerate(self.levels):
            for block in stage.blocks:
                h = block(h)
            h = stage.downsample(h)
            if self.pooled_in:
                h = h + self.pooled_in[level](F.avg_pool2d(images, self.pooled_factors[level]))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))
