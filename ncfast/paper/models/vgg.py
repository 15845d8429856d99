"""VGG with batch norm for small images (the CIFAR layout: 3×3 convolutions, five 2×2 max-pools,
one linear classifier on the pooled 512-channel features)."""

from __future__ import annotations

from torch import nn

from ncfast.paper.models.base import FeatureClassifier, scaled

# Channels per conv layer; "M" is a 2×2 max-pool (Simonyan & Zisserman, configurations A and B).
VGG_LAYERS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}


def vgg(
    name: str, num_classes: int, in_channels: int, image_size: int, width: float
) -> FeatureClassifier:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG_LAYERS[name]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = scaled(item, width)
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        ]
        channels = out
    # 32×32 inputs end at 1×1; larger ones (STL10's 96×96 → 3×3) are average-pooled to 1×1.
    body = nn.Sequential(*layers)
    return FeatureClassifier(body, channels, num_classes, in_channels, image_size)
