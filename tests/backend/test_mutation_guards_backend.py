"""Mutation guards of the backend's wiring (ncfast/backend/ops.py, state.py): which backend the
environment selects and the reason given when the native one is missing, each op dispatched by
name at call time with the reference's signature, and the accumulator state's layout on the
device asked for. In-process calls of the functions that otherwise run once, at import (so
mutmut's mutants of them are reached), pinned exactly; a few milliseconds each."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from ncfast.backend import ops, reference
from ncfast.backend.state import INVALID_LABEL, INVALID_NONFINITE, STATE_KEYS, new_state
from tests.helpers.fake_gpus import fake_cuda_devices

F64 = torch.float64

native = pytest.importorskip("ncfast.backend.native", reason="needs the compiled extension")


# ----------------------------------------------------------------------------- ops._select
@pytest.mark.parametrize("value", ["", "native", " Native ", "NATIVE"])
def test_the_native_backend_is_chosen_unless_the_reference_is_asked_for(monkeypatch, value):
    monkeypatch.setenv("NCFAST_BACKEND", value)
    assert ops._select() == (native, "native", "")


@pytest.mark.parametrize("value", ["reference", " Reference\n"])
def test_the_reference_asked_for_is_chosen_without_loading_the_extension(monkeypatch, value):
    monkeypatch.setenv("NCFAST_BACKEND", value)
    monkeypatch.setattr(ops, "_load_native", lambda: pytest.fail("the extension was loaded"))
    assert ops._select() == (reference, "reference", "forced")


def test_without_the_extension_the_reference_is_chosen_with_the_reason(monkeypatch):
    monkeypatch.delenv("NCFAST_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_load_native", lambda: (None, "ImportError: no _C here"))
    assert ops._select() == (reference, "reference", "ImportError: no _C here")


def test_the_native_backend_asked_for_but_missing_is_an_import_error(monkeypatch):
    monkeypatch.setenv("NCFAST_BACKEND", "native")
    monkeypatch.setattr(ops, "_load_native", lambda: (None, "ImportError: no _C here"))
    with pytest.raises(ImportError) as caught:
        ops._select()
    assert str(caught.value) == (
        "NCFAST_BACKEND=native but the compiled extension ncfast._C is not available "
        "(ImportError: no _C here); reinstall with a C++ compiler (see README) or unset "
        "NCFAST_BACKEND"
    )


def test_an_unknown_backend_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("NCFAST_BACKEND", " CUDA ")
    with pytest.raises(ValueError) as caught:
        ops._select()
    assert str(caught.value) == (
        "NCFAST_BACKEND='cuda' is not a backend; use one of reference, native"
    )


def test_load_native_gives_the_module_or_the_import_error(monkeypatch):
    assert ops._load_native() == (native, "")
    # The import of the extension's module raises (as without a compiled ncfast._C).
    monkeypatch.delattr(sys.modules["ncfast.backend"], "native")
    monkeypatch.setitem(sys.modules, "ncfast.backend.native", None)
    module, why = ops._load_native()
    assert module is None
    assert why == "ModuleNotFoundError: import of ncfast.backend.native halted; None in sys.modules"


# --------------------------------------------------------------------------- ops._dispatch
def test_a_dispatched_op_calls_the_backend_in_use_by_its_name(monkeypatch):
    op = ops._dispatch(reference.ncc_mismatch_count)
    assert op.__name__ == "ncc_mismatch_count"
    assert inspect.signature(op) == inspect.signature(reference.ncc_mismatch_count)
    assert op.__doc__ == (
        "``ncc_mismatch_count`` of the backend in use (see :func:`.reference.ncc_mismatch_count`)."
    )
    calls = []
    for name, module in (("reference", reference), ("native", native)):
        monkeypatch.setattr(
            module, "ncc_mismatch_count", lambda *a, n=name, **k: calls.append((n, a, k)) or n
        )
    for name in ("native", "reference"):
        with ops.use_backend(name):
            assert op(1, 2, key=3) == name
    assert calls == [("native", (1, 2), {"key": 3}), ("reference", (1, 2), {"key": 3})]


# ------------------------------------------------------------------------------ state.py
def test_the_state_layout_and_its_keys():
    assert STATE_KEYS == ("counts", "shift", "sums", "scatter", "invalid")
    assert (INVALID_LABEL, INVALID_NONFINITE) == (0, 1)
    state = new_state(3, 5)
    assert list(state) == list(STATE_KEYS)
    layout = {k: (v.dtype, tuple(v.shape), v.device.type) for k, v in state.items()}
    assert layout == {
        "counts": (torch.int64, (3,), "cpu"),
        "shift": (torch.float64, (3, 5), "cpu"),
        "sums": (torch.float64, (3, 5), "cpu"),
        "scatter": (torch.float64, (5, 5), "cpu"),
        "invalid": (torch.int64, (2,), "cpu"),
    }
    assert all(int(v.count_nonzero()) == 0 for v in state.values())


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_the_state_is_allocated_on_the_device_asked_for(device):
    state = new_state(2, 3, device)
    assert {k: v.device.type for k, v in state.items()} == dict.fromkeys(STATE_KEYS, "meta")


# ------------------------------------------------------------------------- build_info.py
def _fake_gpus(monkeypatch, capabilities):
    """GPUs of the given capabilities, named GPU0, GPU1, ..."""
    fake_cuda_devices(monkeypatch, [(f"GPU{i}", cap) for i, cap in enumerate(capabilities)])


def test_build_info_of_this_cpu_installation(monkeypatch):
    import ncfast._C as compiled

    from ncfast._version import __version__
    from ncfast.backend.build_info import build_info

    # A GPU that CUDA cannot use (e.g. a driver too old for this torch) is not listed.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.setenv("NCFAST_BACKEND", "native")
    info = build_info()
    assert info == {
        "ncfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": False,
        "devices": [],
        "backend": ops.BACKEND,
        "backend_requested": "native",
        "native_unavailable_reason": ops.NATIVE_UNAVAILABLE_REASON or None,
        "device_kernels": [],
        "stats_precision": [
            {
                "device": "cpu",
                "auto": "exact",
                "why": "CPU: float64 GEMM at 1/2 of the float32 rate, affordable",
            }
        ],
        "extension": True,
        "extension_path": compiled.__file__,
        "extension_error": None,
        "extension_cuda": bool(compiled.with_cuda),
        "extension_cuda_version": (
            f"{compiled.cuda_version_int // 1000}.{compiled.cuda_version_int % 1000 // 10}"
            if compiled.cuda_version_int
            else None
        ),
        "extension_arch_list": compiled.cuda_arch_list or None,
        "extension_torch": compiled.torch_version,
        "extension_compiler": compiled.compiler,
    }
    monkeypatch.delenv("NCFAST_BACKEND")
    assert build_info()["backend_requested"] is None
    monkeypatch.setattr(compiled, "cuda_arch_list", "")  # a build without CUDA kernels
    assert build_info()["extension_arch_list"] is None


def test_build_info_without_the_extension(monkeypatch):
    from ncfast.backend.build_info import build_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(sys.modules["ncfast"], "_C")
    monkeypatch.setitem(sys.modules, "ncfast._C", None)
    monkeypatch.setattr(ops, "NATIVE_UNAVAILABLE_REASON", "ImportError: no _C here")
    info = build_info()
    assert info["extension"] is False and info["extension_path"] is None
    assert info["extension_error"] == "import of ncfast._C halted; None in sys.modules"
    assert info["native_unavailable_reason"] == "ImportError: no _C here"
    assert "extension_cuda" not in info and "extension_compiler" not in info


def test_build_info_lists_each_gpu_with_its_kernels_and_precision(monkeypatch):
    from ncfast.backend.build_info import build_info

    _fake_gpus(monkeypatch, [(7, 5), (6, 1), (9, 0), (8, 6)])
    monkeypatch.setattr(ops, "BACKEND", "native")
    monkeypatch.setattr(native, "WITH_CUDA", True)
    monkeypatch.setattr(
        native, "COMPILED_TARGETS", native.parse_arch_list("sm_75;sm_80;compute_90")
    )
    info = build_info()
    assert info["devices"] == ["GPU0", "GPU1", "GPU2", "GPU3"] and info["cuda_available"]
    assert info["device_kernels"] == [
        {
            "device": "cuda:0",
            "name": "GPU0",
            "capability": "7.5",
            "kernel_image": "sm_75",
            "uses": "native kernels, machine code sm_75",
        },
        {
            "device": "cuda:1",
            "name": "GPU1",
            "capability": "6.1",
            "kernel_image": None,
            "uses": "no kernel image: the reference backend",
        },
        {
            "device": "cuda:2",
            "name": "GPU2",
            "capability": "9.0",
            "kernel_image": "compute_90",
            "uses": "native kernels from PTX compute_90 (JIT-compiled by the driver at first use)",
        },
        {
            "device": "cuda:3",
            "name": "GPU3",
            "capability": "8.6",
            "kernel_image": "sm_80",
            "uses": "native kernels, machine code sm_80",
        },
    ]
    assert [(e["device"], e["auto"]) for e in info["stats_precision"]] == [
        ("cpu", "exact"),
        ("cuda:0", "fast"),
        ("cuda:1", "fast"),
        ("cuda:2", "exact"),
        ("cuda:3", "fast"),
    ]
    assert info["stats_precision"][3]["why"] == (
        "GPU2 (compute capability 9.0): float64 at ≥ 1/4 of the float32 rate"
    )


@pytest.mark.parametrize(
    "backend, with_cuda, uses",
    [
        ("reference", True, "the reference backend (native not in use)"),
        ("native", False, "the reference backend (the extension has no CUDA kernels)"),
    ],
)
def test_a_gpu_without_native_kernels_says_why(monkeypatch, backend, with_cuda, uses):
    from ncfast.backend.build_info import build_info

    _fake_gpus(monkeypatch, [(9, 0)])
    monkeypatch.setattr(ops, "BACKEND", backend)
    monkeypatch.setattr(native, "WITH_CUDA", with_cuda)
    (entry,) = build_info()["device_kernels"]
    assert entry == {
        "device": "cuda:0",
        "name": "GPU0",
        "capability": "9.0",
        "kernel_image": None,
        "uses": uses,
    }


# -------------------------------------------------------------------------- precision.py
def test_resolve_precision_names_itself_in_its_error():
    from ncfast.backend.precision import resolve_precision

    assert [resolve_precision(p, "cpu") for p in ("exact", "fast", "auto")] == [
        "exact",
        "fast",
        "exact",
    ]
    with pytest.raises(ValueError) as caught:
        resolve_precision("float64", "cpu")
    assert str(caught.value) == (
        "resolve_precision: precision must be one of exact, fast, auto, got 'float64'"
    )


# ----------------------------------------------------------------------------- native.py
# _schema, _fake, _contiguous_call and _compiled run at import (the ops are registered then):
# called here in-process so that their mutants are reached.
def test_the_schema_and_the_shape_only_kernels():
    for name in ("update_stats_", "ncc_mismatch_count"):
        assert native._schema(name) is getattr(torch.ops.ncfast, name).default._schema
    assert native._fake("update_stats_")(torch.empty(2, 3, device="meta"), 1, k=2) is None
    count = native._fake("ncc_mismatch_count")(torch.empty(2, 3, device="meta"), 1, k=2)
    assert (count.shape, count.dtype, count.device.type) == ((), torch.int64, "meta")


def test_a_shape_only_kernel_for_an_unknown_kind_of_op_is_refused(monkeypatch):
    pair = torch._C.parse_schema("ncfast::pair(Tensor x) -> (Tensor, Tensor)")
    monkeypatch.setattr(native, "_schema", lambda name: pair)
    with pytest.raises(RuntimeError) as caught:
        native._fake("pair")
    assert str(caught.value) == (
        "ncfast::pair returns ['Tensor', 'Tensor']: native._fake knows no such op"
    )


def test_the_contiguous_call_orders_the_arguments_and_copies_back_the_written_ones(monkeypatch):
    received = []

    def op(*values):
        received.append(values)
        for tensor in values[2:7]:  # the state, written in place
            tensor.add_(1)
        return "result"

    call = native._contiguous_call("update_stats_")  # reads the schema: before the patch
    monkeypatch.setattr(torch.ops.ncfast, "update_stats_", op)
    features, labels = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    counts = torch.zeros(4, dtype=torch.int64)
    scatter_t = torch.zeros(3, 3).T  # not contiguous (strides (1, 3))
    shift_wide = torch.zeros(4, 6)[:, ::2]  # not contiguous
    sums, invalid = torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64)
    args = (features, labels, counts, shift_wide)
    kwargs = {"scatter": scatter_t, "sums": sums, "invalid": invalid}
    assert call(args, kwargs) == "result"
    (values,) = received
    assert len(values) == 8 and values[7] is False  # fast's default, made positional
    assert values[0] is features and values[1] is labels and values[2] is counts
    assert values[4] is sums and values[6] is invalid  # contiguous: not copied
    assert values[3] is not shift_wide and values[3].is_contiguous()
    assert values[5] is not scatter_t and values[5].is_contiguous()
    for tensor in (counts, shift_wide, sums, scatter_t, invalid):  # written back
        assert (tensor == 1).all()
    assert call(args, {**kwargs, "fast": True}) == "result" and received[1][7] is True
    with pytest.raises(TypeError) as caught:
        call(args, {**kwargs, "bogus": 1, "also": 2})
    assert str(caught.value) == "ncfast::update_stats_ got unexpected arguments ['also', 'bogus']"


def test_a_compiled_op_has_the_references_name_signature_and_its_own_docstring():
    for name in ("update_stats_", "ncc_mismatch_count"):
        op = getattr(native, name)
        assert op.__name__ == name
        assert inspect.signature(op) == inspect.signature(getattr(reference, name))
        assert op.__doc__ == f"The compiled ``ncfast::{name}`` (see :func:`.reference.{name}`)."


def test_a_compiled_op_runs_the_kernel_or_falls_back(monkeypatch):
    """On the CPU the compiled op runs (keyword features too); a RuntimeError that is not a
    failed kernel image is raised as is; on a GPU the driver cannot load, the reference runs."""
    calls = []
    monkeypatch.setattr(torch.ops.ncfast, "ncc_mismatch_count", lambda *v: calls.append("op") or 7)
    monkeypatch.setattr(reference, "ncc_mismatch_count", lambda *a, **k: calls.append("ref") or 9)
    features = torch.zeros(2, 3)
    rest = (torch.ones(2, dtype=torch.bool),) + (torch.zeros(1),) * 4
    assert native.ncc_mismatch_count(features, *rest) == 7
    names = ("valid", "weight", "bias", "class_means", "present")
    assert native.ncc_mismatch_count(features=features, **dict(zip(names, rest, strict=True))) == 7
    assert calls == ["op", "op"]

    def broken(*values):
        raise RuntimeError("a kernel bug")

    monkeypatch.setattr(torch.ops.ncfast, "ncc_mismatch_count", broken)
    with pytest.raises(RuntimeError, match="^a kernel bug$"):
        native.ncc_mismatch_count(features, *rest)
    assert calls == ["op", "op"]


def _fake_gpus_for_native(monkeypatch, capabilities, targets):
    _fake_gpus(monkeypatch, capabilities)
    monkeypatch.setattr(native, "WITH_CUDA", True)
    monkeypatch.setattr(native, "COMPILED_TARGETS", native.parse_arch_list(targets))
    monkeypatch.setattr(native, "_DEVICE_KERNELS", {})


@pytest.mark.parametrize(
    "targets, listed", [("sm_80;compute_80", "sm_80, compute_80"), ("", "no GPU")]
)
def test_the_fallback_warning_names_the_compiled_images_and_the_fix(monkeypatch, targets, listed):
    _fake_gpus_for_native(monkeypatch, [(7, 0)], targets)
    with pytest.warns(native.NativeKernelFallbackWarning) as record:
        assert native.kernels_for(torch.device("cuda", 0)) is False
    assert str(record[0].message) == (
        f"ncfast: the CUDA kernels of ncfast._C are compiled for {listed}, none of which runs "
        "on compute capability 7.0. Rebuild with TORCH_CUDA_ARCH_LIST=7.0 to use the kernels; "
        "ncfast uses its reference backend for tensors on cuda:0 (GPU0) (correct, slower)."
    )


def test_a_failed_image_on_the_current_device_is_remembered_by_its_index(monkeypatch):
    _fake_gpus_for_native(monkeypatch, [(9, 0), (9, 0)], "sm_90")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    failure = RuntimeError(f"{native.NO_IMAGE}: the driver is too old")
    with pytest.warns(native.NativeKernelFallbackWarning, match="cuda:1 \\(GPU1\\)"):
        assert native._image_failed(torch.device("cuda"), failure)
    assert native._DEVICE_KERNELS == {1: False}


@pytest.mark.parametrize("order", [1, -1])
def test_an_arch_specific_image_is_preferred_to_the_plain_one(order):
    targets = native.parse_arch_list("sm_90;sm_90a")[::order]
    assert str(native.kernel_image_for((9, 0), targets)) == "sm_90a"


def test_version_parts_drop_a_local_version_label():
    assert native._version_parts("2.11+cu128", 2) == (2, 11)
    assert native._version_parts("12.8", 1) == (12,)
    assert native._version_parts(None, 2) is None and native._version_parts("", 2) is None


def test_kernels_run_on_the_cpu_and_on_cuda_devices_with_an_image_only(monkeypatch):
    _fake_gpus_for_native(monkeypatch, [(9, 0), (7, 0)], "sm_90")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert native.kernels_for(torch.device("cpu"))
    assert not native.kernels_for(torch.device("meta"))
    assert native.kernels_for(torch.device("cuda"))  # no index: device 0, as the ops take it
    monkeypatch.setattr(native, "WITH_CUDA", False)  # an extension built without CUDA
    monkeypatch.setattr(native, "_DEVICE_KERNELS", {})
    assert not native.kernels_for(torch.device("cuda", 0))
    assert native._DEVICE_KERNELS == {}


def test_an_arch_list_with_empty_entries_keeps_every_image():
    assert [str(t) for t in native.parse_arch_list(";sm_80,, 9.0+PTX;")] == [
        "sm_80",
        "sm_90",
        "compute_90",
    ]


def test_the_ops_have_shape_only_kernels_for_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        features = torch.empty(4, 3)
        count = torch.ops.ncfast.ncc_mismatch_count(
            features,
            torch.empty(4, dtype=torch.bool),
            torch.empty(2, 3),
            torch.empty(2),
            torch.empty(2, 3, dtype=F64),
            torch.empty(2, dtype=torch.bool),
        )
        assert (count.shape, count.dtype) == ((), torch.int64)
        state = [
            torch.empty(2, dtype=torch.long),
            torch.empty(2, 3, dtype=F64),
            torch.empty(2, 3, dtype=F64),
            torch.empty(3, 3, dtype=F64),
            torch.empty(2, dtype=torch.long),
        ]
        torch.ops.ncfast.update_stats_(features, torch.empty(4, dtype=torch.long), *state, False)
