"""The one interface every ncfast network satisfies, so measurement needs no model-specific code.

A :class:`FeatureClassifier` is an ``nn.Module`` with

- ``features(x) -> [B, P]``: the penultimate-layer activations (what NC is measured on),
- ``classifier``: an ``nn.Linear(P, C)`` with bias (the last layer, ``W`` and ``b`` of the SPEC),
- ``forward(x) == classifier(features(x))``: the logits ``[B, C]``,

plus the attributes ``feature_dim`` (P), ``num_classes`` (C), ``in_channels`` and ``image_size``.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """``body`` maps images to feature maps or vectors; global average pooling and flattening
    turn them into the ``[B, P]`` features the linear ``classifier`` reads."""

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        in_channels: int,
        image_size: int,
    ):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, P]`` of images ``[B, in_channels, H, W]``."""
        return torch.flatten(self.pool(self.body(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def scaled(channels: int, width: float) -> int:
    """``channels · width``, rounded, at least 1: the ``--width`` multiplier of every layer."""
    return max(1, round(channels * width))


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out, as torchvision's ResNet/DenseNet), BN to identity,
    the linear classifier with PyTorch's default, biases of convolutions zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
