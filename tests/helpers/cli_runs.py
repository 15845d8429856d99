"""Driving ``ncfast`` as a user does, in this process through click's runner: a tiny training
run's arguments (``RUN``), ``invoke``, the check of a one-line error, and copying a run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ncfast.cli import main
from tests.helpers.tiny_runs import TINY_TRAIN_ARGS

RUN = ("train", *TINY_TRAIN_ARGS, "--per-class", "5", "--batch-size", "25", "--quiet")
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL and flock")


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, exit_code: int, *phrases: str) -> None:
    """One error, no traceback, the expected exit code and phrases."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for phrase in phrases:
        assert phrase in result.output, result.output


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))
