"""Networks (ncfast.paper.models) and training losses (ncfast.paper.losses)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncfast.paper.losses import LOSSES, check_loss, compute_loss, one_hot, parse_mse_scale
from ncfast.paper.models import FAMILIES, NETS, PAPER_NETS, build, paper_net, parameter_count
from ncfast.paper.models.resnet import StridedPointwiseConv

# Tiny widths keep every network under a second on the CPU.
TINY_WIDTH = {name: 0.0625 for name in NETS}
TINY_WIDTH.update({"densenet250": 0.1, "densenet201": 0.1})


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_interface_32px(net, channels):
    _check_interface(net, channels, 32)


# STL10 (96×96, 3 channels) is trained with these (HPD22 Table A.2).
@pytest.mark.parametrize("net", sorted(set(PAPER_NETS["stl10"].values())))
def test_interface_96px(net):
    _check_interface(net, 3, 96)


def _check_interface(net, channels, size):
    torch.manual_seed(0)
    model = build(net, 10, channels, size, TINY_WIDTH[net])
    assert isinstance(model.classifier, nn.Linear)
    p = model.classifier.in_features
    assert (model.feature_dim, model.num_classes) == (p, 10)
    assert model.classifier.out_features == 10 and model.classifier.bias is not None
    model.train()
    x = torch.randn(3, channels, size, size)
    model(x).sum().backward()  # trains (batch norm in train mode)
    model.eval()
    with torch.no_grad():
        h = model.features(x)
        logits = model(x)
    assert h.shape == (3, p) and logits.shape == (3, 10)
    torch.testing.assert_close(logits, model.classifier(h), rtol=0, atol=0)
    # Features are not trivially constant across inputs.
    assert (h[0] - h[1]).abs().max() > 0


# Training as `ncfast train` does by default (channels-last, batch norm in train mode) a ResNet
# whose stem has fewer than 16 channels on STL10's 96×96 images: oneDNN's strided 1×1
# weight-gradient kernel corrupted the heap there (see StridedPointwiseConv). A crash, so in a
# child process; with nn.Conv2d(stride=2) in the shortcut this crashed in 12 of 12 tries.
RESNET_96PX_CHANNELS_LAST = """
import torch
from ncfast.paper.models import build
torch.manual_seed(0)
model = build("resnet18", 10, 3, 96, 0.0625).to(memory_format=torch.channels_last)  # 4-ch stem
for _ in range(2):
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    model(x).square().mean().backward()
"""


def test_resnet_small_width_trains_channels_last_on_96px():
    result = subprocess.run(
        [sys.executable, "-c", RESNET_96PX_CHANNELS_LAST],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("size", [95, 96])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_pointwise_conv_is_a_strided_1x1_convolution(seed, size, channels_last):
    g = torch.Generator().manual_seed(seed)
    ours = StridedPointwiseConv(3, 5, 2).double()
    reference = nn.Conv2d(3, 5, 1, 2, bias=False).double()
    reference.load_state_dict(ours.state_dict())  # the same parameters under the same keys
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours = x.clone().requires_grad_(True)
    x_ref = x.detach().contiguous().requires_grad_(True)
    out = ours(x_ours)
    expected = reference(x_ref)
    assert out.shape == expected.shape == (2, 5, (size + 1) // 2, (size + 1) // 2)
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    out.backward(upstream)
    expected.backward(upstream)
    # Sums in another order differ by at most (terms)·eps·Σ|terms| per entry.
    eps = torch.finfo(torch.float64).eps
    weight, sampled = reference.weight.detach(), x[:, :, ::2, ::2]
    # Outputs: sums of 3 products.
    bound = 3 * eps * F.conv2d(sampled.abs(), weight.abs())
    assert ((out - expected).abs() <= bound).all()
    # Weight gradient: sums over the 2·⌈size/2⌉² output pixels.
    terms = upstream[:, 0].numel()
    abs_sum = torch.einsum("bohw,bihw->oi", upstream.abs(), sampled.abs())[:, :, None, None]
    assert ((ours.weight.grad - reference.weight.grad).abs() <= terms * eps * abs_sum).all()
    # Input gradient: zero off the stride's grid, sums of 5 products on it.
    bound = 5 * eps * F.conv_transpose2d(upstream.abs(), weight.abs(), stride=2)
    bound = F.pad(bound, (0, size - bound.shape[-1], 0, size - bound.shape[-2]))
    assert ((x_ours.grad - x_ref.grad).abs() <= bound).all()


# Parameter counts of the published small-image variants (10 classes, 3 channels): ResNet18/34/50
# as in kuangliu/pytorch-cifar; DenseNet-BC (L=100, k=12) 0.8M and (L=250, k=24) 15.3M as in
# Huang et al. Table 2; VGG11/13-BN as kuangliu's minus its 2752/2944 conv biases (ours use BN
# without conv bias); DenseNet201 at 96 px equals torchvision's densenet201 with a 10-way head.
PARAMS = {
    ("resnet18", 32): 11_173_962,
    ("resnet34", 32): 21_282_122,
    ("resnet50", 32): 23_520_842,
    ("densenet100", 32): 769_162,
    ("vgg11", 32): 9_231_114 - 2752,
    ("vgg13", 32): 9_416_010 - 2944,
}


@pytest.mark.parametrize(("net", "size"), sorted(PARAMS))
def test_full_width_parameter_counts(net, size):
    model = build(net, 10, 3, size)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[net, size]


@pytest.mark.parametrize(("net", "size"), sorted(PARAMS))
def test_parameter_count_without_building(net, size):
    assert parameter_count(net, 10, 3, size) == PARAMS[net, size]
    # An odd width rounds every layer's channels: the count is the built network's.
    built = build(net, 7, 1, size, 0.3)
    assert parameter_count(net, 7, 1, size, 0.3) == sum(p.numel() for p in built.parameters())


@pytest.mark.slow
def test_counting_parameters_allocates_nothing_and_loads_no_compiler():
    # Counting a width of 1000 (9e12 parameters) must not allocate them, and must not load
    # torch._dynamo (random initialisation of meta tensors does: ~1 s at every `ncfast train`).
    code = (
        "import sys\n"
        "from ncfast.paper.config import TrainConfig\n"
        "from ncfast.paper.models import parameter_count\n"
        "TrainConfig(dataset='mnist5k', net='densenet250', device='cpu').resolved()\n"
        "print(parameter_count('vgg11', 10, 1, 32, 1000.0), 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["9216011200010", "False"]


def test_densenet_large_parameter_counts():
    total = sum(p.numel() for p in build("densenet250", 10, 3).parameters())
    assert round(total / 1e6, 1) == 15.3
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.densenet201(num_classes=10)
    ours = build("densenet201", 10, 3, 96)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def test_resnet_stem_keeps_resolution():
    # SPEC §6: 3×3 stride-1 stem, no max-pool: the first stage sees 32×32 maps.
    model = build("resnet18", 10, 3, 32, 0.0625)
    stem_out = model.body[:3](torch.randn(1, 3, 32, 32))
    assert stem_out.shape[-2:] == (32, 32)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_width_scales_channels():
    assert build("vgg11", 10, 3, 32, 0.5).feature_dim == 256
    assert build("resnet50", 10, 3, 32, 0.25).feature_dim == 512
    assert build("resnet18", 10, 1, 32, 2.0).feature_dim == 1024


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build("resnet18", 10, 3, 32, 0.0625)
    torch.manual_seed(3)
    b = build("resnet18", 10, 3, 32, 0.0625)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_paper_nets_table_a2():
    assert paper_net("svhn", "vgg") == "vgg13"
    assert paper_net("cifar10", "resnet") == "resnet50"
    assert paper_net("fashionmnist", "densenet") == "densenet250"
    assert paper_net("stl10", "densenet") == "densenet201"
    assert paper_net("mnist5k", "resnet") == "resnet18"
    for dataset in PAPER_NETS:
        for family in FAMILIES:
            assert paper_net(dataset, family) in NETS
    with pytest.raises(ValueError, match="dataset"):
        paper_net("imagenet", "vgg")
    with pytest.raises(ValueError, match="family"):
        paper_net("mnist", "alexnet")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"net": "resnet19"}, "net must be one of"),
        ({"num_classes": 1}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"image_size": 28}, "image_size"),
        ({"width": 0}, "width"),
    ],
)
def test_build_rejects_bad_arguments(kwargs, match):
    args = {"net": "vgg11", "num_classes": 10, "in_channels": 3, "image_size": 32, "width": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build(**args)


# ------------------------------------------------------------------------------------- losses
def test_mse_is_pytorch_mse_loss_against_one_hot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (7,), generator=g)
    target = torch.zeros(7, 5, dtype=torch.float64)
    for i, y in enumerate(labels.tolist()):
        target[i, y] = 1.0
    expected = nn.MSELoss()(logits, target)  # mean over the B×C entries
    by_hand = sum((logits[i, j] - target[i, j]) ** 2 for i in range(7) for j in range(5)) / 35
    torch.testing.assert_close(compute_loss("mse", logits, labels), expected)
    torch.testing.assert_close(compute_loss("mse", logits, labels), by_hand)
    torch.testing.assert_close(compute_loss("mse", logits, labels, reduction="sum"), by_hand * 7)


def test_mse_rescaled_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 3])
    k, m = 2.5, 15.0
    per_sample = []
    for i, y in enumerate(labels.tolist()):
        s = k * (logits[i, y] - m) ** 2
        s += sum(logits[i, j] ** 2 for j in range(4) if j != y)
        per_sample.append(s / 4)
    expected = torch.stack(per_sample).mean()
    got = compute_loss("mse-rescaled", logits, labels, (k, m))
    torch.testing.assert_close(got, expected)
    # k = M = 1 is plain mse.
    torch.testing.assert_close(
        compute_loss("mse-rescaled", logits, labels, (1.0, 1.0)),
        compute_loss("mse", logits, labels),
    )


def test_ce_is_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    by_hand = -torch.stack(
        [logits[i, y] - logits[i].exp().sum().log() for i, y in enumerate(labels.tolist())]
    ).mean()
    torch.testing.assert_close(compute_loss("ce", logits, labels), by_hand)
    torch.testing.assert_close(compute_loss("ce", logits, labels), F.cross_entropy(logits, labels))


def test_bf16_logits_are_upcast():
    logits = torch.randn(4, 3).bfloat16()
    labels = torch.tensor([0, 1, 2, 0])
    assert compute_loss("mse", logits, labels).dtype == torch.float32


def test_one_hot():
    assert one_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]


def test_loss_argument_errors():
    assert set(LOSSES) == {"mse", "ce", "mse-rescaled"}
    assert parse_mse_scale("1,15") == (1.0, 15.0)
    with pytest.raises(ValueError, match="k,M"):
        parse_mse_scale("15")
    with pytest.raises(ValueError, match="> 0"):
        parse_mse_scale("0,15")
    with pytest.raises(ValueError, match="needs mse_scale"):
        check_loss("mse-rescaled", None)
    with pytest.raises(ValueError, match="only to loss"):
        check_loss("mse", "1,15")
    with pytest.raises(ValueError, match="loss must be one of"):
        check_loss("hinge", None)
