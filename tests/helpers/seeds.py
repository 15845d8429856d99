"""The random seed of a test: fresh per run, or replayed from ``NCFAST_TEST_SEED``.

The ``seed`` fixture (tests/conftest.py) draws it for one test; a module-scoped fixture that
builds data for many tests (tests/paper/test_e2e.py) draws it with :func:`draw_seed` and reports it
the same way.
"""

from __future__ import annotations

import os
import secrets

import pytest

SEED_ENV = "NCFAST_TEST_SEED"


def draw_seed() -> int:
    """``NCFAST_TEST_SEED`` if set, else a fresh random seed in [0, 2**31)."""
    text = os.environ.get(SEED_ENV, "").strip()
    if text:
        try:
            return int(text)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {text!r}") from None
    return secrets.randbelow(2**31)
