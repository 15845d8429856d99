"""examples/own_training_loop.py (the README's library example) runs as shipped."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_training_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("own_training_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_with_its_defaults_and_shows_collapse(capsys):
    pytest.importorskip("sklearn")
    example = load_example()
    history = example.main([])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["epoch", "loss", "error"]
    assert [int(line.split()[0]) for line in printed[1:]] == [h["epoch"] for h in history]
    assert [h["epoch"] for h in history] == sorted(example.measurement_epochs(40))
    for row in history:
        for key in example.COLUMNS:
            assert math.isfinite(row[key]), (row["epoch"], key)
        assert row["num_samples"] == 1797 and row["classes_present"] == 10
    # Training on the digits collapses the features (seed 0; the trend is large).
    assert history[-1]["nc1"] < 0.5 * history[0]["nc1"]
    assert history[-1]["nc4_ncc_mismatch"] < history[0]["nc4_ncc_mismatch"]
    assert history[-1]["train_error"] < 0.05


def test_example_logs_to_tensorboard(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    load_example().main(["--epochs", "2", "--tensorboard", str(tmp_path)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"nc/nc1", "nc/train_error", "nc/snr_singular_values/9"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("nc/nc1")] == [1, 2]
