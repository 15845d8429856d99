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
