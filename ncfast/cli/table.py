"""``ncfast table RUN_DIR ...``: HPD22's Table 1 (test accuracy at zero error vs at the end)."""

from __future__ import annotations

from pathlib import Path

import click

from ncfast.cli import main
from ncfast.cli._shared import load_runs_for_output


@main.command("table")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for table1.md and table1.csv.",
)
def table_command(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Print and write Table 1 for the runs in RUN_DIR...: test accuracy at the first epoch of
    zero training error vs at the last epoch, with the median and mean improvement."""
    from ncfast.report.tables import write_table1

    runs = load_runs_for_output(run_dirs, out)
    markdown, paths = write_table1(runs, out)
    click.echo(markdown, nl=False)
    click.echo("written: " + ", ".join(str(p) for p in paths))
