"""Shared fixtures of the test suite (plain helpers live in tests/helpers/, by topic:
feeding.py, tolerances.py, synthetic_features.py, tiny_runs.py, ...; the tests in folders by
the layer they test: library/, backend/, paper/, report/, integrations/).

Random tests take the ``seed`` fixture: a fresh seed per test (so repeated runs explore new
inputs), or the value of ``NCFAST_TEST_SEED`` when it is set (to replay a failure). A failing
test's report names its seed and the command line that replays it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Helper modules that assert: pytest rewrites their asserts as it does the tests' (the values
# in a failure's message). Registered before anything imports them.
pytest.register_assert_rewrite(
    "tests.helpers.assertions", "tests.helpers.native_checks", "tests.helpers.tolerances"
)

from tests.helpers.native_checks import NATIVE_MISSING  # noqa: E402
from tests.helpers.seeds import SEED_ENV, draw_seed  # noqa: E402
from tests.helpers.tiny_runs import synthetic_split  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """The random seed of this test (printed when it fails; override with NCFAST_TEST_SEED)."""
    value = draw_seed()
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


def pytest_collection_modifyitems(config, items):
    """Under mutmut (bench/mutation.sh), the mutation guards (test_mutation_guards_*.py) first,
    then the other tests, each group fastest first by the durations mutmut measured
    (mutmut-stats.json, in the folder it runs from): with ``-x`` the first failure ends a
    mutant's run, so a guard spares the slow tests. Guards go first whatever their measured
    time: a test measured fast on the code can hang on a mutant (a sweep waiting for a job the
    mutant calls alive). Otherwise the order stays."""
    stats = Path("mutmut-stats.json")
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.is_file():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(
        key=lambda item: (
            not item.path.name.startswith("test_mutation_guards_"),
            durations.get(item.nodeid, math.inf),
        )
    )


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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module's tests, restored afterwards: tiny networks are
    dominated by per-op overhead, and on a shared 2-core machine a second OpenMP thread only adds
    waiting (on a 2-core CI machine a lane's time is then its CPU time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data():
    """Training and test splits of tests/helpers/tiny_runs.py's synthetic images: 20 and 6 per
    class."""
    return synthetic_split("train", 20, 0), synthetic_split("test", 6, 1)
