"""The one place that chooses between the native extension and the pure-torch reference.

``NCFAST_BACKEND=reference`` or ``native`` forces a backend; unset, the native one is used when
``ncfast._C`` is importable. Every function below has the signature of its twin in
``ncfast.backend.reference``; :class:`Backend` spells those signatures out, and both backend
modules are checked against it (mypy). :func:`use_backend` switches for a block of code (tests
and benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import torch

from ncfast.backend import reference

_BACKENDS = ("reference", "native")
_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


class Backend(Protocol):
    """The ops every backend module provides (the signatures of :mod:`.reference`)."""

    def update_stats_(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        counts: torch.Tensor,
        shift: torch.Tensor,
        sums: torch.Tensor,
        scatter: torch.Tensor,
        invalid: torch.Tensor,
        fast: bool = False,
    ) -> None: ...

    def finalize_stats(
        self, counts: torch.Tensor, shift: torch.Tensor, sums: torch.Tensor, scatter: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reshift(
        self,
        counts: torch.Tensor,
        shift: torch.Tensor,
        sums: torch.Tensor,
        scatter: torch.Tensor,
        new_shift: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def psd_inv_sqrt(
        self, matrix: torch.Tensor, rel_eps: float | None = None
    ) -> tuple[torch.Tensor, int]: ...

    def nc1(
        self, sigma_w: torch.Tensor, mbar: torch.Tensor, rtol: float = ..., atol: float = ...
    ) -> tuple[float, int]: ...

    def snr_singular_values(
        self,
        sigma_w_inv_sqrt: torch.Tensor,
        mbar: torch.Tensor,
        rtol: float = ...,
        atol: float = ...,
    ) -> torch.Tensor: ...

    def pairwise_cosine_stats(
        self, vectors: torch.Tensor, tile: int = ...
    ) -> tuple[float, float]: ...

    def least_squares(
        self, class_means: torch.Tensor, priors: torch.Tensor, sigma_w: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mse_decomposition(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        class_means: torch.Tensor,
        priors: torch.Tensor,
        sigma_w: torch.Tensor,
        lam: float,
    ) -> dict[str, float]: ...

    def ncc_mismatch_count(
        self,
        features: torch.Tensor,
        valid: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        class_means: torch.Tensor,
        present: torch.Tensor,
    ) -> torch.Tensor: ...


def _load_native() -> tuple[Backend | None, str]:
    try:
        from ncfast.backend import native  # optional compiled extension
    except ImportError as exc:  # no extension built: the reference is complete on its own
        return None, f"{type(exc).__name__}: {exc}"
    return native, ""


def _select() -> tuple[Backend, str, str]:
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


def _dispatch(
    method: Callable[Concatenate[Backend, _Params], _Result],
) -> Callable[_Params, _Result]:
    """The op ``method`` names, run by the backend in use at call time (so that
    :func:`use_backend` switches it), with the signature :class:`Backend` gives it."""
    name = method.__name__

    def run(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        op: Callable[_Params, _Result] = getattr(_impl, name)
        return op(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"``{name}`` of the backend in use (see :func:`.reference.{name}`)."
    return run


update_stats_ = _dispatch(Backend.update_stats_)
finalize_stats = _dispatch(Backend.finalize_stats)
reshift = _dispatch(Backend.reshift)
psd_inv_sqrt = _dispatch(Backend.psd_inv_sqrt)
nc1 = _dispatch(Backend.nc1)
snr_singular_values = _dispatch(Backend.snr_singular_values)
pairwise_cosine_stats = _dispatch(Backend.pairwise_cosine_stats)
least_squares = _dispatch(Backend.least_squares)
mse_decomposition = _dispatch(Backend.mse_decomposition)
ncc_mismatch_count = _dispatch(Backend.ncc_mismatch_count)
