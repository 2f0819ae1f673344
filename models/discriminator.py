"""PatchGAN discriminator (pix2pix): one real/fake logit per overlapping image patch."""
from __future__ import annotations

import torch
import torch.nn as nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, *more_batches: torch.Tensor):
        """Logits for one batch, or a tuple for several. Each batch goes through the network on its
        own, so BatchNorm never mixes real and fake statistics (as taming-transformers does); one
        call keeps it a single DDP forward."""
        if not more_batches:
            return self.main(images)
        return tuple(self.main(batch) for batch in (images, *more_batches))
