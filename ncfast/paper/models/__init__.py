"""Networks of the paper (seed Table A.2), all behind one interface (see
:mod:`ncfast.paper.models.base`): ``model.features(x) -> [B, P]``, ``model.classifier`` an
``nn.Linear(P, C)``, ``model(x) == model.classifier(model.features(x))``.

``build(net, num_classes, in_channels, image_size=32, width=1.0)`` makes any of :data:`NETS`;
``paper_net(dataset, family)`` names the depth the paper used for a dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ncfast.paper.models.base import FeatureClassifier
from ncfast.paper.models.densenet import DENSENET_LAYERS, densenet
from ncfast.paper.models.resnet import RESNET_LAYERS, resnet
from ncfast.paper.models.vgg import VGG_LAYERS, vgg

NETS: dict[str, Callable[..., FeatureClassifier]] = {
    **{name: partial(vgg, name) for name in VGG_LAYERS},
    **{name: partial(resnet, name) for name in RESNET_LAYERS},
    **{name: partial(densenet, name) for name in DENSENET_LAYERS},
}

FAMILIES = ("vgg", "resnet", "densenet")

# Seed Table A.2: the depth chosen per dataset and family.
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


def build(
    net: str, num_classes: int, in_channels: int, image_size: int = 32, width: float = 1.0
) -> FeatureClassifier:
    """A freshly initialised network (uses the global torch RNG: seed it first)."""
    if net not in NETS:
        raise ValueError(f"build: net must be one of {sorted(NETS)}, got {net!r}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"build: {arg} must be a positive int, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"build: num_classes must be ≥ 2, got {num_classes}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ValueError(
            f"build: image_size must be a multiple of 32 (32, or 96 for STL10), got {image_size!r}"
        )
    if not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"build: width must be a positive number, got {width!r}")
    return NETS[net](num_classes, in_channels, image_size, float(width))


__all__ = ["FAMILIES", "NETS", "PAPER_NETS", "FeatureClassifier", "build", "paper_net"]
