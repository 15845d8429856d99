"""The one place that chooses between the native extension and the pure-torch reference.

``NCFAST_BACKEND=reference`` or ``native`` forces a backend; unset, the native one is used when
``ncfast._C`` is importable. The switch covers the compiled ops only (``update_stats_``,
``ncc_mismatch_count``), with the reference's signatures (the native module derives its own
from them); the linear algebra below them is the reference's own, torch calls in both
backends. :func:`use_backend` switches for a block of code (tests and benchmarks compare
the two).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import ParamSpec, TypeVar

from ncfast.backend import reference

_BACKENDS = ("reference", "native")
_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def _load_native() -> tuple[ModuleType | None, str]:
    try:
        from ncfast.backend import native  # optional compiled extension
    except ImportError as exc:  # no extension built: the reference is complete on its own
        return None, f"{type(exc).__name__}: {exc}"
    return native, ""


def _select() -> tuple[ModuleType, str, str]:
    requested = os.environ.get("NCFAST_BACKEND", "").strip().lower()
    if requested and requested not in _BACKENDS:
        raise ValueError(
            f"NCFAST_BACKEND={requested!r} is not a backend; use one of {', '.join(_BACKENDS)}"
        )
    native, why_not = _load_native() if requested != "reference" else (None, "forced")
    if requested == "native" and native is None:
        raise ImportError(
            "NCFAST_BACKEND=native but the compiled extension ncfast._C is not available "
            f"({why_not}); reinstall with a C++ compiler (see README) or unset NCFAST_BACKEND"
        )
    if native is not None:
        return native, "native", ""
    return reference, "reference", why_not


_impl, BACKEND, NATIVE_UNAVAILABLE_REASON = _select()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops of backend ``name`` (``"reference"`` or ``"native"``) inside the ``with``
    block, then the previous one again; :data:`BACKEND` says which is in use. ImportError when
    the native extension is asked for but missing. Not thread-safe: for tests and benchmarks."""
    global _impl, BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"use_backend: name must be one of {', '.join(_BACKENDS)}, got {name!r}")
    chosen, why_not = _load_native() if name == "native" else (reference, "")
    if chosen is None:
        raise ImportError(f"use_backend: the native backend is not available ({why_not})")
    previous = _impl, BACKEND
    _impl, BACKEND = chosen, name
    try:
        yield
    finally:
        _impl, BACKEND = previous


def _dispatch(reference_op: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """The op of ``reference_op``'s name, run by the backend in use at call time (so that
    :func:`use_backend` switches it), with the reference's signature."""
    name = reference_op.__name__

    @functools.wraps(reference_op)  # its signature, for help() and inspect
    def run(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        op: Callable[_Params, _Result] = getattr(_impl, name)
        return op(*args, **kwargs)

    run.__doc__ = f"``{name}`` of the backend in use (see :func:`.reference.{name}`)."
    return run


update_stats_ = _dispatch(reference.update_stats_)
ncc_mismatch_count = _dispatch(reference.ncc_mismatch_count)

# Linear algebra on matrices of size P or min(C, P), once per measurement: torch's own
# LAPACK/cuSOLVER/BLAS calls, the same in both backends (no switch; see ncfast.backend.native).
finalize_stats = reference.finalize_stats
reshift = reference.reshift
psd_inv_sqrt = reference.psd_inv_sqrt
nc1 = reference.nc1
snr_singular_values = reference.snr_singular_values
pairwise_cosine_stats = reference.pairwise_cosine_stats
least_squares = reference.least_squares
mse_decomposition = reference.mse_decomposition
