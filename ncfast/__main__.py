"""``python -m ncfast`` and the ``ncfast`` console script: the command line (as ``torchrun -m
ncfast train ...`` needs), or, where the ``paper`` extra is not installed, one line saying so."""

from __future__ import annotations

import importlib.util
import sys

# The import names of pyproject's `paper` extra: the app (ncfast.paper, ncfast.report, the
# command line) needs them, the measuring library does not.
PAPER_DEPENDENCIES = ("torchvision", "click", "tqdm", "matplotlib", "mlxtend", "scipy")


def missing_paper_dependencies() -> list[str]:
    """The modules of the ``paper`` extra that cannot be imported here (none are imported)."""
    return [name for name in PAPER_DEPENDENCIES if importlib.util.find_spec(name) is None]


def run() -> None:
    """Run the ``ncfast`` command line; without the ``paper`` extra, print what to install and
    exit with status 1."""
    missing = missing_paper_dependencies()
    if missing:
        sys.exit(
            f"ncfast: the command line needs the paper extra (missing: {', '.join(missing)}); "
            'install it with: pip install "ncfast[paper]"'
        )
    from ncfast.cli import main

    main(prog_name="ncfast")


if __name__ == "__main__":
    run()
