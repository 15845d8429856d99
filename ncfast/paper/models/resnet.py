"""ResNets with the small-image stem of the reference code: a 3×3 stride-1 convolution and no
max-pool (torchvision's blocks otherwise: BasicBlock for 18/34, Bottleneck for 50)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ncfast.paper.models.base import FeatureClassifier, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class StridedPointwiseConv(nn.Conv2d):
    """A bias-free 1×1 convolution with a stride, computed as subsampling then a stride-1 1×1
    convolution: the same result (a 1×1 kernel without padding reads only the pixels the stride
    lands on), and the same parameters and state-dict keys as ``nn.Conv2d``.

    Why: oneDNN 3.12's AVX-512 weight-gradient kernel (torch 2.14 on CPU) corrupts the heap for
    a strided 1×1 channels-last convolution with fewer than 16 input channels on maps of 56 or
    more pixels (ResNet18 at ``--width 0.125`` on STL10 crashed in 6 of 8 runs). The stride-1
    kernel is not affected."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step_h, step_w = self.stride
        return F.conv2d(x[:, :, ::step_h, ::step_w], self.weight)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    conv = (
        nn.Conv2d(in_planes, out_planes, 1, bias=False)
        if stride == 1
        else StridedPointwiseConv(in_planes, out_planes, stride)
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_planes))


RESNET_LAYERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def resnet(
    name: str, num_classes: int, in_channels: int, image_size: int, width: float
) -> FeatureClassifier:
    block, depths = RESNET_LAYERS[name]
    stem = scaled(64, width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
    ]
    in_planes = stem
    for stage, depth in enumerate(depths):
        planes = scaled(64 * 2**stage, width)
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(block(in_planes, planes, stride))
            in_planes = planes * block.expansion
    body = nn.Sequential(*layers)
    return FeatureClassifier(body, in_planes, num_classes, in_channels, image_size)
