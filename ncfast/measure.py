"""One measurement pass: class statistics and NC4 from the same batches, then every SPEC key."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ncfast.metrics import nc_metrics
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET, NCCMismatch
from ncfast.stats import ClassStats


class Measurement:
    """Feed ``update(features, labels)`` for every batch of a pass, then ``compute()``.

    With a classifier (``weight [C, P]``, ``bias [C]``) the result holds every key of SPEC
    §2–§4 including ``nc4_ncc_mismatch``; ``weight_decay`` is λ of seed Eq. 3 (see
    :func:`ncfast.metrics.mse_lambda`). Without one, the feature-only keys.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
        on_invalid: str = "raise",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.stats = ClassStats(num_classes, dim, device=device, on_invalid=on_invalid)
        self.weight, self.bias, self.weight_decay = weight, bias, weight_decay
        self.ncc = NCCMismatch(weight, bias, memory_budget_bytes) if weight is not None else None

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.stats.update(features, labels)
        if self.ncc is not None:
            self.ncc.update(features, labels)

    @property
    def needs_second_pass(self) -> bool:
        return self.ncc is not None and self.ncc.needs_second_pass

    def compute(self, second_pass: Iterable | Callable[[], Iterable] | None = None) -> dict:
        """The SPEC dict; ``second_pass`` as in :meth:`ncfast.nc4.NCCMismatch.compute`."""
        mismatch = self.ncc.compute(self.stats, second_pass) if self.ncc is not None else None
        return nc_metrics(
            self.stats, self.weight, self.bias, self.weight_decay, ncc_mismatch=mismatch
        )
