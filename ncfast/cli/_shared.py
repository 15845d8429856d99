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


def check_output_dir(out: Path, option: str = "--out") -> None:
    """A UsageError naming ``option`` unless ``out`` is a directory that can be written, or can
    be created (:func:`ncfast.paper.rundir.check_writable_dir`; nothing is left behind)."""
    from ncfast.paper.rundir import RunDirectoryError, check_writable_dir

    try:
        check_writable_dir(out, option)
    except RunDirectoryError as exc:
        raise click.UsageError(str(exc)) from None


def write_failed(exc: OSError, out: Path | None = None) -> click.ClickException:
    """The one-line error of a failed write (disk full, permission lost while running), naming
    the file, or else the output directory ``out``."""
    if exc.filename:
        where = f" {exc.filename}"
    else:
        where = f" to {out}" if out is not None else ""
    return click.ClickException(f"cannot write{where} ({exc.strerror or exc})")


def load_runs_for_output(run_dirs: tuple[Path, ...], out: Path) -> list:
    """The runs in ``run_dirs``, with ``--out`` checked to be a usable directory."""
    from ncfast.report.runs import RunError, load_run

    try:
        runs = [load_run(p) for p in run_dirs]
    except RunError as exc:
        raise click.ClickException(str(exc)) from None
    check_output_dir(out)
    return runs
