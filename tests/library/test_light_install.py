"""``pip install ncfast`` without the ``paper`` extra gives a working library: the measuring
library (ncfast, ncfast.backend) runs with the app's dependencies unimportable, and the
``ncfast`` console script then prints one line naming the extra instead of a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ncfast.__main__ import PAPER_DEPENDENCIES

ROOT = Path(__file__).resolve().parents[2]

# Every module of the paper extra made unimportable, as in an environment without it: a None
# in sys.modules makes `import name` (and `import name.sub`) raise ModuleNotFoundError and
# importlib.util.find_spec(name) return None. Set before ncfast (and torch) are imported.
BLOCK = f"""
import sys
for name in {PAPER_DEPENDENCIES!r}:
    sys.modules[name] = None
"""

# The library's entry points, streamed: ClassStats, nc_metrics, Measurement, NCMonitor (with the
# theory's simulation too, whose progress bar uses tqdm when installed).
LIBRARY_RUN = """
import json, torch, ncfast
from torch import nn
from ncfast import theory
from ncfast.monitor import NCMonitor
g = torch.Generator().manual_seed(0)
labels = torch.arange(60) % 3
features = torch.randn(60, 4, generator=g) + 3 * nn.functional.one_hot(labels, 4).double()
stats = ncfast.ClassStats(num_classes=3, dim=4)
for chunk in range(3):
    stats.update(features[20 * chunk : 20 * (chunk + 1)], labels[20 * chunk : 20 * (chunk + 1)])
m = ncfast.nc_metrics(stats, weight=torch.randn(3, 4, generator=g, dtype=torch.float64))
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
monitor = NCMonitor(model, classifier=model[2])
loader = [(features[i : i + 15].float(), labels[i : i + 15]) for i in range(0, 60, 15)]
row = monitor.evaluate(loader)
run_steps = theory.simulate_central_path(
    theory.initial_features(3, 4, 5, generator=g), 3, 5, progress=True
).times.numel()
blocked = sorted(n for n, mod in sys.modules.items() if mod is None and n in BLOCKED)
try:  # the block is real: the command line's module needs click
    import ncfast.cli
    app_imports = True
except ModuleNotFoundError:
    app_imports = False
from ncfast.__main__ import run
try:
    run()
    text = None
except SystemExit as exc:  # sys.exit(text): text on stderr, exit status 1
    text = exc.code
print(json.dumps({"nc1": float(m["nc1"]), "monitor_nc1": float(row["nc1"]),
                  "steps": run_steps, "blocked_still_none": blocked,
                  "app_imports": app_imports, "exit": text}))
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_the_library_works_without_the_paper_extra():
    code = BLOCK + f"BLOCKED = {PAPER_DEPENDENCIES!r}\n" + LIBRARY_RUN
    done = _python(code)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["nc1"] > 0 and result["monitor_nc1"] > 0
    assert result["steps"] == 6  # the simulation ran all its steps (no bar without tqdm)
    # nothing replaced a blocked entry (a blocked import is an error, never a silent success)
    assert result["blocked_still_none"] == sorted(PAPER_DEPENDENCIES)
    assert not result["app_imports"]  # the block is real: the app cannot import
    # the console script: one line naming the extra and what is missing, exit status 1
    assert 'pip install "ncfast[paper]"' in result["exit"] and "\n" not in result["exit"]
    assert all(name in result["exit"] for name in PAPER_DEPENDENCIES)


def test_the_paper_extra_matches_the_entry_point_check():
    # pyproject's extra and the console script's check name the same modules (pip's name of
    # each package is its import name here), the runtime dependencies are torch and numpy only,
    # and dev installs the extra (the README's commands install dev).
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements}

    assert names(extras["paper"]) == set(PAPER_DEPENDENCIES)
    assert names(project["dependencies"]) == {"torch", "numpy"}
    assert set(PAPER_DEPENDENCIES) <= names(extras["dev"])
    assert set(PAPER_DEPENDENCIES) <= names(extras["all"])
    assert project["scripts"]["ncfast"] == "ncfast.__main__:run"
