"""The ``ncfast`` command line: a thin layer over the library (each command in its own module)."""

from __future__ import annotations

import click

from ncfast._version import __version__
from ncfast.cli._shared import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ncfast")
def main() -> None:
    """Measure Neural Collapse exactly and fast (Han, Papyan & Donoho, ICLR 2022)."""


# Subcommands register themselves here, one import per module.
from ncfast.cli import analyze as _analyze  # noqa: E402, F401
from ncfast.cli import info as _info  # noqa: E402, F401
from ncfast.cli import plot as _plot  # noqa: E402, F401
from ncfast.cli import sweep as _sweep  # noqa: E402, F401
from ncfast.cli import table as _table  # noqa: E402, F401
from ncfast.cli import theory as _theory  # noqa: E402, F401
from ncfast.cli import train as _train  # noqa: E402, F401
