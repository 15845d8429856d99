"""examples/language_model.py (the README's language-model example) runs, in a reduced form."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "language_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("language_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_measures_and_draws(tmp_path, capsys):
    example = load_example()
    argv = ["--steps", "4", "--every", "2", "--width", "16", "--layers", "1", "--seq-len", "16"]
    history = example.main(
        [*argv, "--batch-size", "4", "--eval-tokens", "512", "--out", str(tmp_path)]
    )
    assert [row["step"] for row in history] == [0, 2, 4]
    for row in history:
        assert math.isfinite(row["nc1"]) and 0 <= row["nc4_ncc_mismatch"] <= 1
        assert 1 < row["classes_present"] <= 256 and row["loss"] > 0
    assert history[-1]["loss"] < history[0]["loss"]  # four AdamW steps from ln(256) = 5.5
    for name in ("language_model_nc.png", "language_model_counts.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
