"""Argument checks shared by the whole package: one definition of each, one wording.

Every check raises with a message that names the argument (``name``) and, where given, the
caller (``where``): ``TypeError`` for a value of the wrong kind, ``ValueError`` for one out of
range. None of them reads tensor values (no device synchronisation).
"""

from __future__ import annotations

import math
import numbers

import torch


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def check_int(
    value: object,
    name: str,
    minimum: int,
    where: str | None = None,
    maximum: int | None = None,
) -> int:
    """``value`` as an int in ``minimum..maximum``. A bool is not an int here (``True`` is not a
    class count); numpy integers are accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{_prefix(where)}{name} must be an integer, got {type(value).__name__} {value!r}"
        )
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
        raise ValueError(f"{_prefix(where)}{name} must be an integer {bound}, got {value}")
    return int(value)


def check_number(
    value: object,
    name: str,
    where: str | None = None,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    open_minimum: bool = False,
) -> float:
    """``value`` as a finite float in ``[minimum, maximum]`` (``(minimum, maximum]`` with
    ``open_minimum``); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_prefix(where)}{name} must be a number, got {type(value).__name__} {value!r}"
        )
    number = float(value)
    below = number <= minimum if open_minimum else number < minimum
    if not math.isfinite(number) or below or number > maximum:
        low = "(" if open_minimum else "["
        bound = (
            "> 0"
            if (minimum, maximum, open_minimum) == (0.0, math.inf, True)
            else "≥ 0"
            if (minimum, maximum) == (0.0, math.inf)
            else f"in {low}{minimum:.4g}, {maximum:.4g}]"
        )
        raise ValueError(f"{_prefix(where)}{name} must be a finite number {bound}, got {value!r}")
    return number


def check_device(device: object, name: str = "device", where: str | None = None) -> torch.device:
    """A CPU or CUDA ``torch.device`` from ``device`` (``None``: CUDA when available, else CPU);
    a CUDA device must exist here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{_prefix(where)}{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        )
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{_prefix(where)}{name} {device!r} was asked for but CUDA is not available here"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{_prefix(where)}{name} {device!r}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return parsed


def check_label_dtype(labels: torch.Tensor, name: str = "labels", where: str | None = None) -> None:
    """Labels are class indices: an integer dtype (not bool, float or complex)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{_prefix(where)}{name} must be integer class indices, got {labels.dtype}")
