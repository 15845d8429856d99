"""Shared fixtures of the test suite.

Random tests take the ``seed`` fixture: a fresh seed per test (so repeated runs explore new
inputs), or the value of ``NCFAST_TEST_SEED`` when it is set (to replay a failure). A failing
test's report names its seed and the command line that replays it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

SEED_ENV = "NCFAST_TEST_SEED"


def test_seed() -> int:
    """``NCFAST_TEST_SEED`` if set, else a fresh random seed in [0, 2**31)."""
    text = os.environ.get(SEED_ENV, "").strip()
    if text:
        try:
            return int(text)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {text!r}") from None
    return secrets.randbelow(2**31)


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture
def seed(request) -> int:
    """The random seed of this test (printed when it fails; override with NCFAST_TEST_SEED)."""
    value = test_seed()
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(
                (
                    "random seed",
                    f"seed {seeds[0]}; replay with {SEED_ENV}={seeds[0]} "
                    f"python -m pytest '{item.nodeid}'",
                )
            )
    return report


def _native_missing() -> str:
    """Why the native backend cannot run here ("" when it can)."""
    try:
        from ncfast.backend import native  # noqa: F401
    except ImportError as exc:
        return f"ncfast._C is not built ({exc})"
    return ""


NATIVE_MISSING = _native_missing()
BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(bool(NATIVE_MISSING), reason=NATIVE_MISSING)),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[str]:
    """Runs the test on the reference backend and again on the native one (skipped, with the
    reason, where the extension is not built); yields the backend's name."""
    from ncfast.backend import ops

    with ops.use_backend(request.param):
        yield request.param


def stats_from(features, labels, num_classes: int, dim: int | None = None, **kwargs):
    """A ClassStats that has seen one batch (``update`` returns None, as torchmetrics' does)."""
    from ncfast import ClassStats

    stats = ClassStats(num_classes, features.shape[1] if dim is None else dim, **kwargs)
    stats.update(features, labels)
    return stats
