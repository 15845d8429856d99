"""The layers of ARCHITECTURE.md hold in the code: imports go one way (nothing below the command
line imports it), the measuring library stays light (torch and numpy only), and modules stay
small enough to read (at most 600 lines)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ncfast"

# Which ncfast subpackages each layer must never import (directly, or lazily inside a function).
APP_LAYERS = ("ncfast.paper", "ncfast.report", "ncfast.cli", "ncfast.integrations")
FORBIDDEN = {
    "library": APP_LAYERS,  # ncfast/*.py: stats, metrics, nc4, measure, monitor, theory, ...
    "backend": APP_LAYERS,
    "report": ("ncfast.paper", "ncfast.cli", "ncfast.integrations"),  # reads files only
    "paper": ("ncfast.cli",),  # may use integrations (train logs to TensorBoard), lazily
    "integrations": ("ncfast.paper", "ncfast.cli"),
}
# No exception: the command line parses and prints, nothing below it imports it.

MAX_LINES = 600
# No module over MAX_LINES: a longer one is split into modules of one job each (issue 20).


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts == ("__main__.py",):  # `python -m ncfast`: the command line's entry point
        return "cli"
    return "library" if len(rel.parts) == 1 else rel.parts[0]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from ncfast import paper` imports a subpackage too
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_imports_go_one_way():
    violations = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package
    for path in files:
        forbidden = FORBIDDEN.get(layer_of(path), ())
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_layers_below_the_library_never_import_the_package_root():
    """paper, report, backend and integrations import what they use from its module (the
    version from ncfast._version), never from the package root: ``import ncfast`` or
    ``from ncfast import X`` would tie them to the root's exports and risk import cycles."""
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if layer_of(path) not in ("paper", "report", "backend", "integrations"):
            continue
        for line, module in imported_modules(path):
            if module == "ncfast":
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports ncfast")
    assert not violations, "imports of the package root:\n" + "\n".join(violations)


def test_no_module_is_over_600_lines():
    lines = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    assert len(lines) > 20  # the scan sees the package
    over = {where: n for where, n in lines.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_scan_sees_a_forbidden_import(tmp_path):
    # The test above can fail: a library-style file importing the app is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ncfast.paper import train\n")
    assert (2, "ncfast.paper") in imported_modules(bad)


HEAVY = (
    "torchvision",
    "matplotlib",
    "scipy",
    "mlxtend",
    "pandas",
    "lightning",
    "pytorch_lightning",
    "torchmetrics",
    "tensorboard",
    "click",  # (not tqdm: `import torch` itself loads it)
    "submitit",
    "ncfast.paper",
    "ncfast.report",
    "ncfast.cli",
    "ncfast.integrations",
)

ROUND_TRIP = """
import json, sys, torch, ncfast
g = torch.Generator().manual_seed(0)
stats = ncfast.ClassStats(num_classes=3, dim=4)
stats.update(torch.randn(30, 4, generator=g), torch.arange(30) % 3)
m = ncfast.Measurement(3, 4, weight=torch.randn(3, 4, generator=g))
m.update(torch.randn(30, 4, generator=g) + torch.arange(30)[:, None] % 3, torch.arange(30) % 3)
ncfast.nc_metrics(stats, weight=torch.randn(3, 4, generator=g))
m.compute()
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.slow
def test_the_library_round_trip_loads_no_heavy_module():
    out = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.splitlines()[-1])
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, f"a ClassStats -> nc_metrics round trip imported {heavy}"


def test_the_mutation_config_names_existing_modules_and_tests():
    """[tool.mutmut.module_tests] (bench/mutation.sh) follows the layout: every module and
    test file it names exists (a moved module or test file must move its entry too)."""
    import tomllib

    root = PACKAGE.parent
    table = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    module_tests = table["tool"]["mutmut"]["module_tests"]
    missing = [m for m in module_tests if not (root / m).is_file()]
    missing += [t for tests in module_tests.values() for t in tests if not (root / t).is_file()]
    assert not missing, f"module_tests names files that do not exist: {missing}"
