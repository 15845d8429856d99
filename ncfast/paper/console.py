"""What a training run prints (rank 0): the progress bars of :class:`Console` and, at each
measured epoch, :func:`summary_line` and :func:`overhead_line`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ncfast.paper.config import TrainConfig

if TYPE_CHECKING:
    from ncfast.paper.sgd_epoch import EpochResult


class Console:
    """What a run prints (rank 0): the epoch bar and each epoch's batch bar (with
    ``progress``), and at each measured epoch its summary line (with ``progress`` or
    ``measure_overhead``) and the measurement's overhead (with ``measure_overhead``)."""

    def __init__(self, config: TrainConfig, start_epoch: int, progress: bool) -> None:
        self.progress = progress
        self.measure_overhead = config.measure_overhead
        self.bar = tqdm(
            total=config.epochs,
            initial=start_epoch,
            desc=f"{config.dataset}/{config.net}/{config.loss}",
            unit="epoch",
            disable=not progress,
            dynamic_ncols=True,
        )

    def epochs(self, first: int, stop: int):
        """The epochs ``first..stop-1``, counted on the bar."""
        for epoch in range(first, stop):
            yield epoch
            self.bar.update(1)

    def batches(self, batches: list, epoch: int):
        return tqdm(
            batches, desc=f"epoch {epoch}", leave=False, disable=not self.progress, unit="batch"
        )

    def trained(self, sgd: EpochResult) -> None:
        self.bar.set_postfix(
            loss=f"{sgd.loss:.4g}", err=f"{sgd.error:.4f}", epoch_s=f"{sgd.seconds:.1f}"
        )

    def measured(self, epoch: int, rows: list[dict], epoch_time: float) -> None:
        if self.progress or self.measure_overhead:
            tqdm.write(summary_line(epoch, rows))
        if self.measure_overhead:
            tqdm.write(overhead_line(epoch, epoch_time, rows))

    def close(self) -> None:
        self.bar.close()


def summary_line(epoch: int, rows: list[dict]) -> str:
    """One line per measured epoch: each split's error, loss, NC1 and NC4, and the time."""
    parts = [f"epoch {epoch:4d}"]
    for row in rows:
        parts.append(
            f"{row['split']}: err {row['error']:.4f} loss {row['loss']:.4g} "
            f"nc1 {row['nc1']:.3g} nc4 {row.get('nc4_ncc_mismatch', float('nan')):.3g}"
        )
    parts.append(f"measured in {sum(r['measure_time'] for r in rows):.1f} s")
    return " | ".join(parts)


def overhead_line(epoch: int, epoch_time: float, rows: list[dict]) -> str:
    """The measurement's cost beyond plain forward passes, next to the training epoch's."""
    measure = sum(r["measure_time"] for r in rows)
    forward = sum(r["forward_time"] for r in rows)
    beyond = measure - forward
    return (
        f"epoch {epoch:4d} overhead: training {epoch_time:.2f} s | measurement {measure:.2f} s "
        f"= forward passes {forward:.2f} s + statistics {beyond:.2f} s "
        f"({100 * beyond / epoch_time:+.1f}% of the training epoch beyond the forward passes)"
    )
