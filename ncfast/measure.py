"""One measurement pass: class statistics and NC4 from the same batches, then every SPEC key."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ncfast.checks import check_int
from ncfast.metrics import nc_metrics
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET, NCCMismatch, mismatch_fraction
from ncfast.stats import ClassStats


class Measurement:
    """Feed ``update(features, labels)`` for every batch of a pass, then ``compute()``.

    With a classifier (``weight [C, P]``, ``bias [C]``) the result holds every key of SPEC
    §2–§4 including ``nc4_ncc_mismatch``; ``weight_decay`` is λ of HPD22 Eq. 3 (see
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
        num_classes = check_int(num_classes, "num_classes", 1, "Measurement")
        dim = check_int(dim, "dim", 1, "Measurement")
        check_int(memory_budget_bytes, "memory_budget_bytes", 0, "Measurement")
        self.stats = ClassStats(num_classes, dim, device=device, on_invalid=on_invalid)
        self.weight, self.bias, self.weight_decay = weight, bias, weight_decay
        self.ncc = NCCMismatch(weight, bias, memory_budget_bytes) if weight is not None else None
        self.reduced = False  # the statistics hold every rank's samples (compute(distributed=True))

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.reduced:
            raise ValueError(
                "Measurement.update: the statistics were already all-reduced across processes by "
                "compute(distributed=True); start a new Measurement for a new pass"
            )
        self.stats.update(features, labels)
        if self.ncc is not None:
            self.ncc.update(features, labels)

    @property
    def needs_second_pass(self) -> bool:
        return self.ncc is not None and self.ncc.needs_second_pass

    def compute(
        self,
        second_pass: Iterable | Callable[[], Iterable] | None = None,
        distributed: bool = False,
        group=None,
    ) -> dict:
        """The SPEC dict; ``second_pass`` as in :meth:`ncfast.nc4.NCCMismatch.compute`.

        ``distributed=True`` (torch.distributed initialised; collective, every rank of ``group``
        calls it): the statistics are all-reduced first (:meth:`ClassStats.all_reduce`, once per
        Measurement), NC4 counts each rank's own samples against those global means and sums the
        counts, so every rank returns the metrics of all the samples of all ranks.
        """
        if distributed and not self.reduced:
            self.stats.all_reduce(group)
            self.reduced = True
        mismatch = None
        if self.ncc is not None:
            counts = torch.stack(self.ncc.count(self.stats, second_pass))
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(counts, group=group)
            mismatch = mismatch_fraction(counts[0], counts[1], self.stats)
        return nc_metrics(
            self.stats, self.weight, self.bias, self.weight_decay, ncc_mismatch=mismatch
        )
