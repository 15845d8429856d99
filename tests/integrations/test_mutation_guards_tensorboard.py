"""Guards of ncfast.integrations.tensorboard against small mutants: the tags (``{prefix}/{key}``,
no prefix, the default ``nc``), the values handed to ``add_scalar`` (floats: 0-d tensors, bools,
numpy scalars, the entries of a vector from 1, None as NaN) at the given step, in order, and
their count; the errors naming the function and the bad argument (a writer without
``add_scalar``, metrics that are not a dict, a value that is no number, text); and
:class:`TensorBoardWriter` end to end: the event file in ``log_dir`` with the writer's options,
read back with TensorBoard's own reader after ``close`` or the ``with`` block, and the clear
ImportError without TensorBoard.

A recording stand-in writer takes the calls; the real SummaryWriter stores each value as a
float32, so values read back are compared with their float32 rounding, exactly. The whole
file runs in a few seconds."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from ncfast.integrations.tensorboard import TensorBoardWriter, log_to_tensorboard


class Recorder:
    """Anything with ``add_scalar``: keeps each call as ``(tag, value, step)``."""

    def __init__(self):
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


# A SPEC-like dict with every kind of value a row can hold.
METRICS = {
    "nc1": 0.25,
    "nc4_ncc_mismatch": torch.tensor(0.5, dtype=torch.float64),  # a 0-d tensor
    "num_samples": 12,
    "nc4_dropped": True,  # a bool is a number (1.0)
    "loss_mse": np.float32(0.75),  # numpy scalars too
    "snr_singular_values": torch.tensor([3.0, 1.5], dtype=torch.float64),
}
EXPECTED = [
    ("nc1", 0.25),
    ("nc4_ncc_mismatch", 0.5),
    ("num_samples", 12.0),
    ("nc4_dropped", 1.0),
    ("loss_mse", 0.75),
    ("snr_singular_values/1", 3.0),
    ("snr_singular_values/2", 1.5),
]


def test_every_scalar_under_the_prefix_at_the_step_in_order():
    writer = Recorder()
    written = log_to_tensorboard(writer, METRICS, 7, prefix="val")
    assert writer.calls == [(f"val/{tag}", value, 7) for tag, value in EXPECTED]
    assert all(type(value) is float for _, value, _ in writer.calls)
    assert written == len(EXPECTED) == 7
    # The default prefix is "nc"; an empty one leaves the keys bare (no leading "/").
    default = Recorder()
    assert log_to_tensorboard(default, {"nc1": 0.5}, 0) == 1
    assert default.calls == [("nc/nc1", 0.5, 0)]
    bare = Recorder()
    assert log_to_tensorboard(bare, {"nc1": 0.5, "snr": [2, None]}, 3, prefix="") == 3
    assert bare.calls[:2] == [("nc1", 0.5, 3), ("snr/1", 2.0, 3)]
    assert bare.calls[2][0] == "snr/2" and math.isnan(bare.calls[2][1])
    # Nothing to write: no call, 0 written.
    empty = Recorder()
    assert log_to_tensorboard(empty, {}, 1) == 0 and empty.calls == []


def test_text_is_refused_naming_its_key():
    """Text values raise (tests/library/test_monitor.py pins it too): nothing of the row is
    written."""
    writer = Recorder()
    row = {"nc1": 0.5, "run": "a", "num_samples": 4}
    with pytest.raises(TypeError, match=r"log_to_tensorboard: metrics\['run'\] is a str"):
        log_to_tensorboard(writer, row, 2)
    assert writer.calls == []


def test_a_nan_row_is_written_without_its_reason():
    """The row of ``on_degenerate="nan"`` (what a monitor or the Lightning callback gives for
    a pass with one class) is written as NaN; ``nc_undefined`` (its reason, text) is left
    out, and the row passed in is not changed."""
    writer = Recorder()
    row = {"nc1": math.nan, "nc_undefined": "1 of 3 classes had samples", "num_samples": 4}
    assert log_to_tensorboard(writer, row, 2) == 2
    assert [tag for tag, _, _ in writer.calls] == ["nc/nc1", "nc/num_samples"]
    assert math.isnan(writer.calls[0][1]) and writer.calls[1][1:] == (4.0, 2)
    assert "nc_undefined" in row
    with pytest.raises(TypeError, match=r"metrics\['run'\] is a str"):
        log_to_tensorboard(writer, {**row, "run": "a"}, 3)  # other text still refused
    assert len(writer.calls) == 2


def test_bad_arguments_name_the_function_and_the_argument():
    with pytest.raises(
        TypeError, match=r"log_to_tensorboard: writer must have add_scalar.*got int"
    ):
        log_to_tensorboard(3, METRICS, 0)

    class NotCallable:
        add_scalar = "a string, not a method"

    with pytest.raises(TypeError, match="writer must have add_scalar.*got NotCallable"):
        log_to_tensorboard(NotCallable(), METRICS, 0)
    with pytest.raises(TypeError, match="log_to_tensorboard: metrics must be a dict, got list"):
        log_to_tensorboard(Recorder(), [("nc1", 0.5)], 0)
    writer = Recorder()
    with pytest.raises(TypeError, match=r"log_to_tensorboard: metrics\['m'\] is a Tensor"):
        log_to_tensorboard(writer, {"nc1": 0.5, "m": torch.zeros(2, 2)}, 0)
    assert writer.calls == []  # checked before anything is written


def events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files in ``log_dir``, by TensorBoard."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def f32(value: float) -> float:
    """The float32 rounding TensorBoard stores a scalar with (``simple_value``)."""
    return float(np.float32(value))


def test_writer_writes_an_event_file_in_log_dir_with_its_options(tmp_path):
    log_dir = tmp_path / "tb"
    writer = TensorBoardWriter(log_dir, filename_suffix=".guard")  # a Path, kwargs passed on
    assert writer.prefix == "nc"
    assert writer.log({"nc1": 0.1, "snr": [2.0, 0.3]}, 5) == 3
    assert writer.log({"nc1": 0.2}, 6) == 1
    writer.close()  # flushes: the events are on disk now
    files = list(log_dir.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".guard")
    assert events(log_dir) == {
        "nc/nc1": [(5, f32(0.1)), (6, f32(0.2))],
        "nc/snr/1": [(5, 2.0)],
        "nc/snr/2": [(5, f32(0.3))],
    }


def test_writer_as_a_context_manager_with_its_prefix(tmp_path):
    with TensorBoardWriter(str(tmp_path), prefix="train") as writer:
        assert isinstance(writer, TensorBoardWriter) and writer.prefix == "train"
        assert writer.log(METRICS, 1) == len(EXPECTED)
    # Leaving the block closed the writer: everything is on disk.
    assert events(tmp_path) == {f"train/{tag}": [(1, f32(value))] for tag, value in EXPECTED}


def test_writer_without_tensorboard_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"TensorBoardWriter needs the tensorboard package"):
        TensorBoardWriter(tmp_path)
    assert list(tmp_path.iterdir()) == []
