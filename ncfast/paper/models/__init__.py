"""Networks of the paper (HPD22 Table A.2), all behind one interface (see
:mod:`ncfast.paper.models.base`): ``model.features(x) -> [B, P]``, ``model.classifier`` an
``nn.Linear(P, C)``, ``model(x) == model.classifier(model.features(x))``.

``build(net, num_classes, in_channels, image_size=32, width=1.0)`` makes any of :data:`NETS`;
``parameter_count(...)`` counts its parameters without making it; ``paper_net(dataset, family)``
names the depth the paper used for a dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ncfast.checks import check_int, check_number
from ncfast.paper.models.base import FeatureClassifier, init_weights
from ncfast.paper.models.densenet import DENSENET_LAYERS, densenet
from ncfast.paper.models.resnet import RESNET_LAYERS, resnet
from ncfast.paper.models.vgg import VGG_LAYERS, vgg

NETS: dict[str, Callable[..., FeatureClassifier]] = {
    **{name: partial(vgg, name) for name in VGG_LAYERS},
    **{name: partial(resnet, name) for name in RESNET_LAYERS},
    **{name: partial(densenet, name) for name in DENSENET_LAYERS},
}

FAMILIES = ("vgg", "resnet", "densenet")

# HPD22 Table A.2: the depth chosen per dataset and family.
PAPER_NETS: dict[str, dict[str, str]] = {
    "mnist": {"vgg": "vgg11", "resnet": "resnet18", "densenet": "densenet40"},
    "fashionmnist": {"vgg": "vgg11", "resnet": "resnet18", "densenet": "densenet250"},
    "svhn": {"vgg": "vgg13", "resnet": "resnet34", "densenet": "densenet40"},
    "cifar10": {"vgg": "vgg11", "resnet": "resnet50", "densenet": "densenet100"},
    "stl10": {"vgg": "vgg11", "resnet": "resnet18", "densenet": "densenet201"},
}
# The embedded MNIST subset is MNIST.
PAPER_NETS["mnist5k"] = PAPER_NETS["mnist"]


def paper_net(dataset: str, family: str) -> str:
    """The network the paper trained on ``dataset`` for ``family`` (vgg, resnet, densenet)."""
    if dataset not in PAPER_NETS:
        raise ValueError(f"paper_net: dataset must be one of {sorted(PAPER_NETS)}, got {dataset!r}")
    if family not in FAMILIES:
        raise ValueError(f"paper_net: family must be one of {list(FAMILIES)}, got {family!r}")
    return PAPER_NETS[dataset][family]


def _check_build_arguments(
    net: str, num_classes: int, in_channels: int, image_size: int, width: float
) -> None:
    if net not in NETS:
        raise ValueError(f"build: net must be one of {sorted(NETS)}, got {net!r}")
    check_int(num_classes, "num_classes", 2, "build")
    check_int(in_channels, "in_channels", 1, "build")
    if check_int(image_size, "image_size", 32, "build") % 32:
        raise ValueError(
            f"build: image_size must be a multiple of 32 (32, or 96 for STL10), got {image_size!r}"
        )
    check_number(width, "width", "build", minimum=0.0, open_minimum=True)


def build(
    net: str, num_classes: int, in_channels: int, image_size: int = 32, width: float = 1.0
) -> FeatureClassifier:
    """A freshly initialised network (uses the global torch RNG: seed it first)."""
    _check_build_arguments(net, num_classes, in_channels, image_size, width)
    model = NETS[net](num_classes, in_channels, image_size, float(width))
    init_weights(model)
    return model


def parameter_count(
    net: str, num_classes: int, in_channels: int, image_size: int = 32, width: float = 1.0
) -> int:
    """The number of parameters :func:`build` would give ``net``, without allocating them: the
    layers are made on the meta device and not initialised (random initialisation of meta
    tensors would load torch's compiler stack, seconds at every start). A width whose layers
    cannot exist raises the RuntimeError (or OverflowError) of their allocation."""
    _check_build_arguments(net, num_classes, in_channels, image_size, width)
    with torch.device("meta"):
        model = NETS[net](num_classes, in_channels, image_size, float(width))
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "FAMILIES",
    "NETS",
    "PAPER_NETS",
    "FeatureClassifier",
    "build",
    "paper_net",
    "parameter_count",
]
