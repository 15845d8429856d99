"""TensorBoard: every scalar of a SPEC dict (and each SNR singular value) as a TensorBoard scalar.

:func:`log_to_tensorboard` writes to any object with ``add_scalar`` (a
``torch.utils.tensorboard.SummaryWriter``); :class:`TensorBoardWriter` owns such a writer. (Not
named ``TensorBoardLogger``: that is Lightning's logger class, with another interface.)
TensorBoard itself is optional (``pip install 'ncfast[tensorboard]'``) and imported on first use.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["TensorBoardWriter", "log_to_tensorboard"]


def log_to_tensorboard(writer, metrics: dict, step: int, prefix: str = "nc") -> int:
    """Write every scalar of ``metrics`` (a SPEC dict) as ``{prefix}/{key}`` at ``step``, and each
    entry of a vector value (``snr_singular_values``) as ``{prefix}/{key}/{j}``, j from 1.
    ``writer``: anything with ``add_scalar(tag, value, step)`` (a
    ``torch.utils.tensorboard.SummaryWriter``). Returns the number of scalars written.
    """
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "log_to_tensorboard: writer must have add_scalar(tag, value, step), e.g. a "
            f"torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}"
        )
    if not isinstance(metrics, dict):
        raise TypeError(f"log_to_tensorboard: metrics must be a dict, got {type(metrics).__name__}")
    written = 0
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, numbers.Real):
            writer.add_scalar(tag, float(value), step)
            written += 1
            continue
        values = _vector(value)
        if values is None:
            raise TypeError(
                f"log_to_tensorboard: metrics[{key!r}] is a {type(value).__name__}; only numbers "
                "and 1-d sequences of numbers can be logged"
            )
        for j, v in enumerate(values, start=1):
            writer.add_scalar(f"{tag}/{j}", v, step)
            written += 1
    return written


def _vector(value) -> list[float] | None:
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().tolist() if value.dim() == 1 else None
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.astype(float).tolist() if value.ndim == 1 else None
    except ImportError:  # numpy is a dependency; keep the helper usable without it anyway
        pass
    if isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) for v in value):
        return [float(v) for v in value]
    return None


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
