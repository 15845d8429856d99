"""Which code runs on which GPU, decided without one: the compiled kernel images against a mocked
device capability (CUDA's SASS/PTX compatibility rules), the fallback to the reference with one
warning naming the capability, `ncfast info`'s report, the default TORCH_CUDA_ARCH_LIST of
setup.py, and the deterministic-algorithms rule of the update.
"""

from __future__ import annotations

import importlib.util
import types
import warnings
from pathlib import Path

import pytest
import torch

from ncfast.backend import reference
from tests.helpers.fake_gpus import fake_cuda_devices
from tests.helpers.warning_origin import assert_warned_from

try:
    from ncfast.backend import native as native_backend
except ImportError as exc:  # no compiled extension: nothing here applies
    pytest.skip(f"ncfast._C is not built ({exc})", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
# TORCH_CUDA_ARCH_LIST=7.5;8.0;8.6;8.9;9.0+PTX;10.0;12.0, as setup.py's default with CUDA 13.
DEFAULT_CUDA13 = "sm_75;sm_80;sm_86;sm_89;sm_90;sm_100;sm_120;compute_90"


def _targets(text):
    return native_backend.parse_arch_list(text)


@pytest.mark.parametrize(
    "capability, targets, expected",
    [
        ((7, 5), DEFAULT_CUDA13, "sm_75"),  # T4
        ((7, 0), DEFAULT_CUDA13, None),  # V100: below every image, PTX included
        ((8, 7), DEFAULT_CUDA13, "sm_86"),  # Orin: SASS of the same major, lower minor
        ((8, 9), DEFAULT_CUDA13, "sm_89"),  # the newest compatible SASS, not sm_80/sm_86
        ((10, 3), DEFAULT_CUDA13, "sm_100"),
        ((11, 0), DEFAULT_CUDA13, "compute_90"),  # no SASS of major 11: PTX, JIT-compiled
        ((12, 1), DEFAULT_CUDA13, "sm_120"),
        ((7, 5), "8.0;9.0+PTX", None),  # the old default on a T4: no kernel at all
        ((8, 6), "8.0;9.0+PTX", "sm_80"),
        ((8, 6), "8.9", None),  # SASS never runs on a lower minor
        ((9, 0), "9.0a", "sm_90a"),
        ((10, 0), "9.0a+PTX", None),  # arch-specific images run on that capability only
        ((10, 3), "sm_100f", "sm_100f"),  # family images run within their major
        ((12, 0), "compute_100f", None),
        ((7, 5), "compute_75", "compute_75"),
        ((6, 1), "compute_75", None),  # PTX is never compiled down to an older GPU
    ],
)
def test_kernel_image_follows_cuda_compatibility_rules(capability, targets, expected):
    image = native_backend.kernel_image_for(capability, _targets(targets))
    assert (str(image) if image is not None else None) == expected


def test_arch_lists_of_both_forms_parse_alike():
    assert _targets("7.5 8.0;9.0+PTX") == _targets("sm_75,sm_80;sm_90;compute_90")
    assert [str(t) for t in _targets("9.0a+PTX")] == ["sm_90a", "compute_90a"]
    with pytest.raises(ValueError, match="'Hopper' is neither"):
        native_backend.parse_arch_list("8.0;Hopper")


@pytest.fixture
def mocked_gpus(monkeypatch):
    """CUDA devices that are not there: {index: (name, capability)}, kernels compiled for
    DEFAULT_CUDA13, and a fresh per-device cache."""

    def install(devices: dict[int, tuple[str, tuple[int, int]]], targets=DEFAULT_CUDA13):
        monkeypatch.setattr(native_backend, "WITH_CUDA", True)
        monkeypatch.setattr(native_backend, "COMPILED_TARGETS", _targets(targets))
        monkeypatch.setattr(native_backend, "_DEVICE_KERNELS", {})
        fake_cuda_devices(monkeypatch, [devices[i] for i in range(len(devices))])

    return install


def _record_reference_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("update_stats_", "ncc_mismatch_count"):
        monkeypatch.setattr(reference, name, lambda *a, name=name: calls.append(name))
    return calls


def test_gpu_without_a_kernel_falls_back_with_one_warning(mocked_gpus, monkeypatch):
    mocked_gpus({0: ("Tesla V100-SXM2-16GB", (7, 0)), 1: ("Tesla T4", (7, 5))})
    calls = _record_reference_calls(monkeypatch)
    v100 = types.SimpleNamespace(device=torch.device("cuda", 0))  # only .device is read
    with pytest.warns(
        native_backend.NativeKernelFallbackWarning, match=r"compute capability 7\.0"
    ) as record:
        native_backend.update_stats_(v100, *[None] * 6)
    assert_warned_from(record[0], __file__)  # the caller's line, not ncfast's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, not per call
        native_backend.update_stats_(v100, *[None] * 6)
        native_backend.ncc_mismatch_count(v100, *[None] * 5)
    assert calls == ["update_stats_", "update_stats_", "ncc_mismatch_count"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_backend.kernels_for(torch.device("cuda", 1))  # the T4 runs sm_75, silently
    assert native_backend._DEVICE_KERNELS == {0: False, 1: True}


def test_fallback_warning_points_at_the_callers_line_however_deep(mocked_gpus):
    mocked_gpus({0: ("Tesla V100-SXM2-16GB", (7, 0)), 1: ("Tesla P100", (6, 0))})
    with pytest.warns(native_backend.NativeKernelFallbackWarning) as shallow:
        native_backend.kernels_for(torch.device("cuda", 0))
    with pytest.warns(native_backend.NativeKernelFallbackWarning) as deep:
        native_backend.update_kernels_for(torch.device("cuda", 1))
    assert_warned_from(shallow[0], __file__)
    assert_warned_from(deep[0], __file__)


@pytest.mark.parametrize("op", ["update_stats_", "ncc_mismatch_count"])
def test_kernels_the_driver_cannot_load_fall_back_with_one_warning(mocked_gpus, monkeypatch, op):
    """The op refuses before launching anything when the driver cannot load its kernels (PTX
    newer than the driver, say; csrc/cuda/device_common.cuh, ensure_loadable): that batch and
    every later one on the device take the reference; any other error propagates."""
    mocked_gpus({0: ("NVIDIA H200", (9, 0))})  # an image is there: the op is called
    calls = _record_reference_calls(monkeypatch)
    tried = []

    def refuse(*args):
        tried.append(op)
        raise RuntimeError(
            f"{native_backend.NO_IMAGE} for {op}'s kernels on this GPU (the provided PTX was "
            "compiled with an unsupported toolchain.)"
        )

    monkeypatch.setattr(torch.ops.ncfast, op, refuse)
    h200 = types.SimpleNamespace(device=torch.device("cuda", 0))
    # Only .device of the features is read; the rest is passed on (state: contiguous tensors;
    # NC4's masks: bool tensors).
    args = [h200, None, *[torch.zeros(1)] * 5] if op == "update_stats_" else [h200, *[None] * 5]
    if op == "ncc_mismatch_count":
        args[1] = args[5] = torch.ones(1, dtype=torch.bool)
    fn = getattr(native_backend, op)
    with pytest.warns(native_backend.NativeKernelFallbackWarning, match="unsupported toolchain"):
        fn(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(*args)
    assert tried == [op] and calls == [op, op]
    assert native_backend._DEVICE_KERNELS == {0: False}

    def other(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    native_backend._DEVICE_KERNELS.clear()
    monkeypatch.setattr(torch.ops.ncfast, op, other)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        fn(*args)


def test_deterministic_mode_takes_the_reference_update_on_cuda(mocked_gpus, monkeypatch):
    """Float64 atomics make the CUDA class sums depend on block order: under
    torch.use_deterministic_algorithms(True) the update goes to the reference (whose CUDA
    index_add_ torch makes deterministic); NC4 (integer counts) keeps its kernels."""
    mocked_gpus({0: ("NVIDIA H200", (9, 0))})
    gpu = torch.device("cuda", 0)
    assert native_backend.update_kernels_for(gpu)
    calls = _record_reference_calls(monkeypatch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not native_backend.update_kernels_for(gpu)
        assert native_backend.kernels_for(gpu)
        assert native_backend.update_kernels_for(torch.device("cpu"))  # the CPU update is ordered
        native_backend.update_stats_(types.SimpleNamespace(device=gpu), *[None] * 6)
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls == ["update_stats_"]


def test_cpu_update_is_bitwise_reproducible_under_deterministic_mode(seed):
    from ncfast.backend.reference import STATE_KEYS, new_state
    from tests.helpers.native_checks import make_batch

    g = torch.Generator().manual_seed(seed)
    batches = [make_batch(700, 40, 9, torch.float32, torch.int64, g, "cpu") for _ in range(2)]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        states = []
        for _ in range(2):
            state = new_state(9, 40)
            for x, y in batches:
                torch.ops.ncfast.update_stats_(x, y, *(state[k] for k in STATE_KEYS))
            states.append(state)
    finally:
        torch.use_deterministic_algorithms(was)
    for k in STATE_KEYS:
        assert torch.equal(states[0][k], states[1][k]), k


def test_info_reports_what_each_gpu_uses(mocked_gpus):
    from click.testing import CliRunner

    from ncfast.cli import main

    mocked_gpus({0: ("Tesla T4", (7, 5)), 1: ("Tesla P100", (6, 0)), 2: ("Future", (11, 0))})
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("cuda:0 (Tesla T4, compute capability 7.5): native" in li and "sm_75" in li
               for li in lines)  # fmt: skip
    assert "cuda:1 (Tesla P100, compute capability 6.0): no kernel image" in result.output
    assert any(li.startswith("cuda:2") and "PTX compute_90" in li for li in lines)

    from ncfast.backend.build_info import build_info

    kernels = build_info()["device_kernels"]
    assert [k["kernel_image"] for k in kernels] == ["sm_75", None, "compute_90"]
    assert [k["capability"] for k in kernels] == ["7.5", "6.0", "11.0"]


def _setup_module():
    spec = importlib.util.spec_from_file_location("ncfast_setup", ROOT / "setup.py")
    if spec is None or not (ROOT / "setup.py").exists():
        pytest.skip("setup.py is not next to the tests")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


TORCH_CU130_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
NVCC_13 = {"sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100", "sm_120"}
NVCC_12 = NVCC_13 | {"sm_50", "sm_52", "sm_60", "sm_61", "sm_70", "sm_72"}


@pytest.mark.parametrize(
    "torch_arches, nvcc_codes, expected",
    [
        (TORCH_CU130_ARCHES, NVCC_13, "7.5;8.0;8.6;8.9;9.0+PTX;10.0;12.0"),  # nvcc 13: no sm_70
        # nvcc 12 with a torch that still builds Maxwell: from sm_60 on (float64 atomicAdd)
        (["sm_50", "sm_61", "sm_70", "sm_90"], NVCC_12, "6.1;7.0;7.5;8.0;8.6;8.9;9.0+PTX"),
        ([], None, "7.0;7.5;8.0;8.6;8.9;9.0+PTX"),  # CPU torch, nvcc that cannot say
        ([], {"sm_75", "sm_80"}, "7.5;8.0+PTX"),  # PTX on the newest when 9.0 is missing
    ],
)
def test_default_arch_list_covers_common_gpus(torch_arches, nvcc_codes, expected):
    assert _setup_module().default_arch_list(torch_arches, nvcc_codes) == expected


def test_recorded_targets_are_what_nvcc_embeds():
    setup = _setup_module()
    assert setup.compiled_targets("8.0;9.0+PTX") == "sm_80;sm_90;compute_90"
    assert setup.compiled_targets("Ampere") == "sm_80;sm_86;compute_86"  # torch's named list
    # The extension's own record parses back to the images that run where expected.
    targets = native_backend.parse_arch_list(setup.compiled_targets("7.5;9.0+PTX;12.0"))
    assert str(native_backend.kernel_image_for((11, 0), targets)) == "compute_90"
