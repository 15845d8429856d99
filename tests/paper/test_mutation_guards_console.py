"""Guards of ncfast.paper.console against small mutants: the exact text of the summary and
overhead lines, which lines a measured epoch prints (with ``progress`` and/or
``measure_overhead``), the epoch bar (its title, start, unit, count and postfix) and the batch
bar (title, unit, cleared at its end), and that nothing reaches the terminal without
``progress``. No training: the console is driven directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ncfast.paper.config import TrainConfig
from ncfast.paper.console import Console, overhead_line, summary_line

ROWS = [
    {
        "split": "train",
        "error": 0.123456,
        "loss": 0.0012345678,
        "nc1": 12.3456,
        "nc4_ncc_mismatch": 0.00123,
        "measure_time": 1.25,
        "forward_time": 0.5,
    },
    {
        "split": "test",
        "error": 0.5,
        "loss": 2.0,
        "nc1": 0.5,
        "measure_time": 2.0,
        "forward_time": 1.0,
    },
]


def test_summary_line_text():
    assert summary_line(7, ROWS) == (
        "epoch    7 | train: err 0.1235 loss 0.001235 nc1 12.3 nc4 0.00123 | "
        "test: err 0.5000 loss 2 nc1 0.5 nc4 nan | measured in 3.2 s"
    )
    assert summary_line(12345, []) == "epoch 12345 | measured in 0.0 s"


def test_overhead_line_text():
    # measurement 3.25 s = forward 1.5 s + 1.75 s beyond: 1.75/5 = 35 % of the epoch.
    assert overhead_line(3, 5.0, ROWS) == (
        "epoch    3 overhead: training 5.00 s | measurement 3.25 s = forward passes 1.50 s + "
        "statistics 1.75 s (+35.0% of the training epoch beyond the forward passes)"
    )


def _config(measure_overhead: bool) -> TrainConfig:
    return TrainConfig(
        dataset="cifar10", net="vgg", loss="ce", epochs=7, measure_overhead=measure_overhead
    )


@pytest.mark.parametrize(
    ("progress", "measure_overhead", "lines"),
    [(False, False, 0), (True, False, 1), (False, True, 2), (True, True, 2)],
)
def test_measured_prints_the_summary_and_the_overhead(progress, measure_overhead, lines, capsys):
    console = Console(_config(measure_overhead), 0, progress)
    capsys.readouterr()
    console.measured(3, ROWS, 5.0)
    expected = [summary_line(3, ROWS), overhead_line(3, 5.0, ROWS)][:lines]
    assert capsys.readouterr().out.splitlines() == expected
    assert console.progress is progress and console.measure_overhead is measure_overhead
    console.close()


def test_the_bars_with_progress(capsys):
    console = Console(_config(False), 2, True)
    assert console.bar.total == 7 and console.bar.n == 2 and not console.bar.disable
    assert list(console.epochs(2, 5)) == [2, 3, 4]
    assert console.bar.n == 5  # one update per epoch
    console.trained(SimpleNamespace(loss=0.0123456, error=0.25, seconds=12.345))
    assert console.bar.postfix == "epoch_s=12.3, err=0.2500, loss=0.01235"  # tqdm sorts
    batches = console.batches([1, 2, 3], 4)
    assert not batches.disable and list(batches) == [1, 2, 3]
    console.close()
    assert console.bar.disable  # closed: tqdm disables a closed bar
    assert console.bar.desc == "cifar10/vgg/ce"
    err = capsys.readouterr().err
    assert "cifar10/vgg/ce" in err and "epoch/s" in err and "2/7" in err
    assert "epoch 4" in err and "batch/s" in err
    assert console.bar.unit == "epoch" and console.bar.dynamic_ncols
    # The batch bar is cleared at its end (leave=False).
    assert batches.desc == "epoch 4" and batches.unit == "batch" and batches.leave is False


def test_nothing_reaches_the_terminal_without_progress(capsys):
    console = Console(_config(False), 0, False)
    assert list(console.epochs(0, 2)) == [0, 1]
    console.trained(SimpleNamespace(loss=1.0, error=0.5, seconds=1.0))
    assert list(console.batches([1, 2], 0)) == [1, 2]
    console.measured(1, ROWS, 5.0)
    console.close()
    assert capsys.readouterr() == ("", "")
