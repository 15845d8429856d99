"""``ncfast plot RUN_DIR [RUN_DIR ...] --out DIR``: HPD22's figures from run directories."""

from __future__ import annotations

from pathlib import Path

import click

from ncfast.cli import main
from ncfast.cli._shared import figure_formats_option, load_runs_for_output


@main.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the figures (created if missing).",
)
@figure_formats_option
def plot_command(run_dirs: tuple[Path, ...], out: Path, formats: tuple[str, ...]) -> None:
    """Plot the runs in RUN_DIR... (written by `ncfast train --out`) in the style of HPD22's
    Figs. 2–12: one panel per dataset × network, runs of a cell overlaid (e.g. MSE vs CE)."""
    from ncfast.report.plots import plot_runs

    runs = load_runs_for_output(run_dirs, out)
    paths = plot_runs(runs, out, formats)
    for path in paths:
        click.echo(str(path))
    click.echo(f"{len(paths)} files from {len(runs)} run(s) in {out}")
