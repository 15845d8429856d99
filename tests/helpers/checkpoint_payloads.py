"""A valid checkpoint payload built by hand, for the tests of ncfast.paper.checkpoint's checks."""

from __future__ import annotations

import torch

from ncfast.paper.checkpoint import FORMAT


def valid_payload(**fields) -> dict:
    """A valid checkpoint payload of a one-weight model after one epoch, built by hand (no
    torch.optim: its first use costs seconds), with ``fields`` replaced."""
    payload = {
        "format": FORMAT,
        "ncfast_version": "x",
        "epoch": 1,
        "config": {"epochs": 2},
        "model": {"weight": torch.zeros(2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"milestones": {2: 1}, "last_epoch": 1},
        "rng": {"torch": torch.get_rng_state()},
        "history": [{"epoch": 1, "split": "train", "error": 0.5}],
    }
    payload.update(fields)
    return payload
