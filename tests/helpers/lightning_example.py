"""examples/lightning_callback.py loaded as a module (its digits data and model) and a quiet
float64 CPU Lightning ``Trainer``, for the tests of the Lightning callback. Import it only after
``pytest.importorskip("lightning")`` (and ``"sklearn"``, which the example's data needs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_callback.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lightning_callback", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def trainer(callbacks, epochs, **kwargs):
    options = dict(
        accelerator="cpu",
        precision="64-true",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)
