"""Options and helpers that several commands share."""

from __future__ import annotations

from pathlib import Path

import click

figure_formats_option = click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["png", "pdf", "svg"]),
    default=("png", "pdf"),
    show_default=True,
    help="Figure format; repeat for several.",
)


def load_runs_for_output(run_dirs: tuple[Path, ...], out: Path) -> list:
    """The runs in ``run_dirs``, with ``--out`` checked to be a usable directory."""
    from ncfast.runs import RunError, load_run

    try:
        runs = [load_run(p) for p in run_dirs]
    except RunError as exc:
        raise click.ClickException(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out: {out} exists and is not a directory")
    return runs
