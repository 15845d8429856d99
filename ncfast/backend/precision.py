"""The precision policy of the per-batch scatter product (docs/precision.md).

- ``exact``: the class-centred rows and their product zᵀz in float64 (ncfast's original update).
- ``fast``: the centring and the class sums stay float64; the centred rows are rounded to
  float32 and their product is one IEEE float32 GEMM (never TF32 or bf16, whatever torch's
  global flags say), added into the float64 scatter once per batch. Its error is bounded
  relative to the within-class spread itself, not to the size of the means
  (:func:`fast_scatter_bound`).
- ``auto``: ``exact`` where float64 is affordable, ``fast`` where it is not, per device
  (:func:`auto_precision`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

PRECISIONS = ("exact", "fast", "auto")
FLOAT32_UNIT_ROUNDOFF = 2.0**-24  # u32 = eps32 / 2: |fl(x) − x| ≤ u32 |x| (round to nearest)

# GPUs whose float64 rate is ≥ 1/4 of their float32 rate (datacenter parts): P100 (6.0),
# V100 (7.0), A100 (8.0), H100/H200 (9.0), B200 (10.0). Every other capability (T4, the RTX and
# L4/L40 series, Jetson, B300) has 1/32 or less.
STRONG_FLOAT64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})

# On CPUs float64 GEMMs run at half the float32 rate (SIMD width): the update's exact product
# costs 1.6–2.1× the fast one per batch (bench/results/precision_cpu.txt), and nothing
# measurable end to end next to the forward pass (bench/results/end_to_end_cpu.txt), so auto
# keeps the exact product there (docs/precision.md).
CPU_AUTO = "exact"


def check_precision(precision: object, where: str) -> str:
    """``precision`` if it names a policy; ValueError naming the argument otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return precision


def auto_precision(device: torch.device | str) -> tuple[str, str]:
    """(the policy ``auto`` picks on ``device``, why), for ``ncfast info`` and config.json."""
    return _auto_precision(torch.device(device))


@functools.cache
def _auto_precision(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        arch = f"compute capability {capability[0]}.{capability[1]}"
        if capability in STRONG_FLOAT64_CAPABILITIES:
            return "exact", f"{name} ({arch}): float64 at ≥ 1/4 of the float32 rate"
        return "fast", f"{name} ({arch}): float64 at ≤ 1/32 of the float32 rate"
    if device.type == "cpu":
        return CPU_AUTO, "CPU: float64 GEMM at 1/2 of the float32 rate, affordable"
    return "fast", f"{device.type}: float64 rate unknown"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``exact`` or ``fast``: ``precision`` itself, or what ``auto`` picks on ``device``."""
    if precision == "auto":
        return auto_precision(device)[0]
    return check_precision(precision, "resolve_precision")


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """float32 products in IEEE float32 inside the block: TF32 (CUDA) and bf16/TF32 (oneDNN on
    CPUs) are switched off and torch's flags restored afterwards (the Python twin of the
    extension's ``Ieee32Matmul``). torch < 2.9 has one flag for both, the float32 matmul
    precision ("highest" is IEEE)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        saved_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved_precision)
        return
    flags = (matmul, torch.backends.mkldnn.matmul)  # type: ignore[attr-defined]
    saved = [flag.fp32_precision for flag in flags]
    try:
        for flag in flags:
            flag.fp32_precision = "ieee"
        yield
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.fp32_precision = value
