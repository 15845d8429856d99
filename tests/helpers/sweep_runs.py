"""Run directories of a sweep in the states the sweep reads (a config only, a checkpoint, a
finished log), written with ncfast's own formats, for the sweep's guard tests."""

from __future__ import annotations

import json
from pathlib import Path

from ncfast.paper.checkpoint import save_checkpoint
from ncfast.paper.run_files import RUN_FORMAT
from tests.helpers.checkpoint_payloads import valid_payload


def finished_rows(epochs: int, error: float = 0.25) -> list[dict]:
    return [
        {"epoch": epochs, "split": "train", "error": 0.0},
        {"epoch": epochs, "split": "test", "error": error},
    ]


def write_checkpoint(run_dir: Path, epoch: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / "checkpoint.pt", valid_payload(epoch=epoch))


def write_config(run_dir: Path) -> None:
    """config.json with ncfast's marker: what ncfast train writes first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = {"format": RUN_FORMAT, "ncfast_version": "0.3.0"}
    (run_dir / "config.json").write_text(json.dumps(marker))
