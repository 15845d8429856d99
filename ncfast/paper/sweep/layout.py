"""A sweep directory's layout (file names), its error, and small helpers every part uses."""

from __future__ import annotations

import time

from ncfast.errors import NCFastError

SWEEP_FILE = "sweep.json"
SELECTED_FILE = "selected.json"
RUNS_DIR = "runs"
REPORT_DIR = "report"
SLURM_DIR = "slurm"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "sweep.log"
# sweep.json's format: 1 stored the runs' options as `ncfast train` words (read through the
# command line's parser, see Sweep's ``read_train_args``); 2 stores them as TrainConfig fields.
FORMAT = 2
FORMATS = (1, 2)
# The states of a run, as Sweep.state gives them.
STATES = ("done", "running", "failed", "queued", "waiting")
# The longest text of a user's value that a message repeats (a huge value is cut, never echoed).
SHOWN_CHARS = 60


class SweepError(NCFastError, ValueError):
    """A sweep that cannot be set up or continued as asked; the message names the option."""


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def shown(value) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` characters (with the full length said)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[: SHOWN_CHARS - 10]}... ({len(text)} characters)"
