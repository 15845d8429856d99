"""Argument checks shared by the whole package: one definition of each, one wording.

Every check raises with a message that names the argument (``name``) and, where given, the
caller (``where``): ``TypeError`` for a value of the wrong kind, ``ValueError`` for one out of
range. None of them reads tensor values (no device synchronisation).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias, TypeVar

import torch

_First = TypeVar("_First")
_Second = TypeVar("_Second")

# Batches of pairs, or a callable returning a fresh iterable of them (a second pass over data
# that a generator would have used up): PairSource[Tensor, Tensor] for (features, labels).
PairSource: TypeAlias = (
    Iterable[tuple[_First, _Second]] | Callable[[], Iterable[tuple[_First, _Second]]]
)


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
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
        raise ValueError(f"{_prefix(where)}{name} must be an integer {bound}, got {value}")
    return number


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
    parsed: torch.device | None = None
    if isinstance(device, (str, torch.device, int)) and not isinstance(device, bool):
        try:
            parsed = torch.device(device)
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


def check_weight_decay(value: object, where: str | None = None) -> float:
    """λ of HPD22 Eq. 3 (SPEC §3), the weight decay of the MSE decomposition: a finite
    number ≥ 0."""
    return check_number(value, "weight_decay (λ of SPEC §3)", where, minimum=0.0)


def check_classifier(
    weight: object,
    bias: object,
    where: str,
    num_classes: int | None = None,
    dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ``[C, P]``, bias ``[C]``) of a linear classifier, detached; ``bias=None`` is a
    zero bias. ``weight`` must be a 2-D tensor, of shape ``[num_classes, dim]`` where those are
    given; ``bias`` a tensor of shape ``[C]``. The dtype and device are left as they are."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if num_classes is not None and dim is not None:
        if weight.shape != (num_classes, dim):
            raise ValueError(
                f"{where}: weight must have shape [num_classes, dim] = [{num_classes}, {dim}], "
                f"got {list(weight.shape)}"
            )
    elif weight.dim() != 2:
        raise ValueError(
            f"{where}: weight must have shape [num_classes, dim], got {list(weight.shape)}"
        )
    classes = weight.shape[0]
    if bias is None:
        bias = weight.new_zeros(classes)
    if not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"{where}: bias must be a tensor of shape [{classes}] or None, "
            f"got {type(bias).__name__}"
        )
    if bias.shape != (classes,):
        raise ValueError(
            f"{where}: bias must be a tensor of shape [{classes}] or None, got {list(bias.shape)}"
        )
    return weight.detach(), bias.detach()


def iter_pairs(
    batches: PairSource[_First, _Second], where: str, first: str = "inputs"
) -> Iterator[tuple[_First, _Second]]:
    """The ``(first, labels)`` pairs of ``batches`` (an iterable of pairs, or a callable returning
    one), checking that it is iterable and that each batch is a pair (a tuple or list of
    two, as DataLoaders yield); the values themselves are the caller's to check."""
    iterable = batches() if callable(batches) else batches
    try:
        iterator = iter(iterable)
    except TypeError:
        raise TypeError(
            f"{where}: batches must be an iterable of ({first}, labels), got "
            f"{type(iterable).__name__}"
        ) from None
    for batch in iterator:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise ValueError(
                f"{where}: each batch must be a ({first}, labels) pair, got "
                f"{type(batch).__name__}{length}"
            )
        yield batch[0], batch[1]
