"""The one place that chooses between the native extension and the pure-torch reference.

``NCFAST_BACKEND=reference`` or ``native`` forces a backend; unset, the native one is used when
``ncfast._C`` is importable. Every function below has the signature of its twin in
``ncfast.backend.reference``.
"""

from __future__ import annotations

import os
from types import ModuleType

from ncfast.backend import reference

_BACKENDS = ("reference", "native")


def _load_native() -> tuple[ModuleType | None, str]:
    try:
        from ncfast.backend import native as _native  # optional compiled extension
    except ImportError as exc:  # no extension built: the reference is complete on its own
        return None, f"{type(exc).__name__}: {exc}"
    return _native, ""


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


def update_stats_(features, labels, counts, shift, sums, scatter, invalid) -> None:
    _impl.update_stats_(features, labels, counts, shift, sums, scatter, invalid)


def finalize_stats(counts, shift, sums, scatter):
    return _impl.finalize_stats(counts, shift, sums, scatter)


def reshift(counts, shift, sums, scatter, new_shift):
    return _impl.reshift(counts, shift, sums, scatter, new_shift)


def psd_inv_sqrt(matrix, rel_eps=None):
    return _impl.psd_inv_sqrt(matrix, rel_eps)


def nc1(sigma_w, mbar, rtol=1e-10, atol=0.0):
    return _impl.nc1(sigma_w, mbar, rtol, atol)


def snr_singular_values(sigma_w_inv_sqrt, mbar, rtol=1e-10, atol=0.0):
    return _impl.snr_singular_values(sigma_w_inv_sqrt, mbar, rtol, atol)


def pairwise_cosine_stats(vectors, tile=0):
    return _impl.pairwise_cosine_stats(vectors, tile)


def least_squares(class_means, priors, sigma_w, lam):
    return _impl.least_squares(class_means, priors, sigma_w, lam)


def mse_decomposition(weight, bias, class_means, priors, sigma_w, lam):
    return _impl.mse_decomposition(weight, bias, class_means, priors, sigma_w, lam)


def ncc_mismatch_count(features, valid, weight, bias, class_means, present):
    return _impl.ncc_mismatch_count(features, valid, weight, bias, class_means, present)
