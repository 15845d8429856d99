"""TensorBoard: every scalar of a SPEC dict (and each SNR singular value) as a TensorBoard scalar.

:func:`log_to_tensorboard` writes to any object with ``add_scalar`` (a
``torch.utils.tensorboard.SummaryWriter``); :class:`TensorBoardWriter` owns such a writer. (Not
named ``TensorBoardLogger``: that is Lightning's logger class, with another interface.)
TensorBoard itself is optional (``pip install 'ncfast[tensorboard]'``) and imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping

from ncfast.measure import flat_scalars

__all__ = ["TensorBoardWriter", "log_to_tensorboard"]


def log_to_tensorboard(writer, metrics: dict, step: int, prefix: str = "nc") -> int:
    """Write every scalar of ``metrics`` (a SPEC dict) as ``{prefix}/{key}`` at ``step``, and each
    entry of a vector value (``snr_singular_values``) as ``{prefix}/{key}/{j}``, j from 1.
    A row of NaN metrics (``on_degenerate="nan"``) is written as NaN, without its reason
    (``nc_undefined``, text); any other text value is a TypeError.
    ``writer``: anything with ``add_scalar(tag, value, step)`` (a
    ``torch.utils.tensorboard.SummaryWriter``). Returns the number of scalars written.
    """
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "log_to_tensorboard: writer must have add_scalar(tag, value, step), e.g. a "
            f"torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}"
        )
    if isinstance(metrics, Mapping) and isinstance(metrics.get("nc_undefined"), str):
        # The row of on_degenerate="nan": its metrics are written (NaN), the reason is text.
        metrics = {key: value for key, value in metrics.items() if key != "nc_undefined"}
    values = flat_scalars(
        metrics, f"{prefix}/" if prefix else "", "log_to_tensorboard", text_allowed=False
    )
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
    return len(values)


class TensorBoardWriter:
    """A ``SummaryWriter`` on ``log_dir`` that logs SPEC dicts: ``log(metrics, step)``.

    TensorBoard is optional (``pip install 'ncfast[tensorboard]'``); it is imported here, on
    first use, and its absence is a clear ImportError.
    """

    def __init__(self, log_dir: str, prefix: str = "nc", **writer_kwargs):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "TensorBoardWriter needs the tensorboard package, which is not installed: "
                "pip install 'ncfast[tensorboard]' (or pip install tensorboard)"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir), **writer_kwargs)
        self.prefix = prefix

    def log(self, metrics: dict, step: int) -> int:
        return log_to_tensorboard(self.writer, metrics, step, self.prefix)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
