"""The examples in the docstrings of the entry points a user calls first run and print what
they show (doctest), so the documentation cannot drift from the code."""

from __future__ import annotations

import doctest

import pytest

import ncfast
import ncfast.measure
import ncfast.metrics
import ncfast.monitor
import ncfast.stats

ENTRY_POINTS = [
    ncfast.ClassStats,
    ncfast.ClassStats.update,
    ncfast.ClassStats.merge,
    ncfast.ClassStats.reduced,
    ncfast.nc_metrics,
    ncfast.Measurement,
    ncfast.Measurement.compute,
    ncfast.NCMonitor,
    ncfast.NCMonitor.measure,
    ncfast.NCMonitor.evaluate,
    ncfast.NCMonitor.watch_training,
    ncfast.scalars,
]


_NEEDS = {"torchmetrics": "torchmetrics", "lightning": "lightning", "frame": "pandas"}


def _optional(module: str, name: str):
    pytest.importorskip(_NEEDS[module.split(".")[-1]])
    return getattr(__import__(module, fromlist=[name]), name)


def _run(obj) -> None:
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    tests = [t for t in finder.find(obj, getattr(obj, "__qualname__", "")) if t.examples]
    assert tests, f"{obj.__qualname__} has no example"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{obj.__qualname__}: {runner.failures} example(s) failed"


@pytest.mark.parametrize("obj", ENTRY_POINTS, ids=lambda obj: obj.__qualname__)
def test_the_examples_of_the_library_run(obj):
    _run(obj)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("ncfast.integrations.torchmetrics", "NeuralCollapse"),
        ("ncfast.integrations.lightning", "NeuralCollapseCallback"),
        ("ncfast.report.frame", "read_runs"),
    ],
)
def test_the_examples_of_the_integrations_run(module, name):
    _run(_optional(module, name))
