"""DenseNets with bottleneck layers and compression (DenseNet-BC, Huang et al. 2017).

- ``densenet40``, ``densenet100``, ``densenet250``: the CIFAR layouts — three dense blocks of
  (depth − 4) / 6 bottleneck layers, growth rate 12 (40, 100) or 24 (250), a 3×3 stem with 2k
  channels.
- ``densenet201``: the ImageNet layout (blocks of 6, 12, 48, 32 layers, growth rate 32, as
  torchvision's); on 32-pixel images its stem is a 3×3 stride-1 convolution, on larger ones
  (STL10's 96×96) torchvision's 7×7 stride-2 convolution and 3×3 stride-2 max-pool.
"""

from __future__ import annotations

import torch
from torch import nn

from ncfast.paper.models.base import FeatureClassifier, scaled

BOTTLENECK_FACTOR = 4  # the 1×1 convolution outputs 4k channels
COMPRESSION = 0.5  # transitions halve the channels

# name -> (layers per dense block, growth rate, ImageNet stem on large images)
DENSENET_LAYERS = {
    "densenet40": ((6, 6, 6), 12, False),
    "densenet100": ((16, 16, 16), 12, False),
    "densenet250": ((41, 41, 41), 24, False),
    "densenet201": ((6, 12, 48, 32), 32, True),
}


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        inner = BOTTLENECK_FACTOR * growth
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.branch(x)], 1)


def _transition(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.AvgPool2d(2),
    )


def densenet(
    name: str, num_classes: int, in_channels: int, image_size: int, width: float
) -> FeatureClassifier:
    blocks, growth_rate, imagenet_stem = DENSENET_LAYERS[name]
    growth = scaled(growth_rate, width)
    channels = 2 * growth
    if imagenet_stem and image_size > 32:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
    else:
        layers = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
    for i, depth in enumerate(blocks):
        for _ in range(depth):
            layers.append(DenseLayer(channels, growth))
            channels += growth
        if i < len(blocks) - 1:
            out = max(1, int(channels * COMPRESSION))
            layers.append(_transition(channels, out))
            channels = out
    layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    body = nn.Sequential(*layers)
    return FeatureClassifier(body, channels, num_classes, in_channels, image_size)
