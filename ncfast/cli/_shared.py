"""What the commands share: the one place errors become messages and exit codes, and options
and helpers several commands use."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from ncfast.errors import NCFastError

# Keys of click's context meta (shared by a command and its group) that commands set for the
# error messages: a prefix of every error line (e.g. the torchrun rank), and the output
# directory that a failed write names when the OSError names no file (default: --out).
ERROR_PREFIX = "ncfast.error_prefix"
OUTPUT_DIR = "ncfast.output_dir"


class Command(click.Command):
    """A command whose errors print as one line (``Error: ...``), never a traceback:

    - :class:`ncfast.errors.NCFastError` (the run, its files or its data cannot be used as
      asked): its message, exit code 1;
    - any other ``ValueError`` (an option the library refused): a usage error, exit code 2;
    - ``OSError`` (a write failed: disk full, permission lost): ``cannot write FILE (reason)``,
      exit code 1.

    Python warnings print as one line, ``Warning: ...`` (not the source line that raised them).
    """

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():  # restores the previous display afterwards
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except NCFastError as exc:  # first: most of them are ValueErrors too
            raise click.ClickException(ctx.meta.get(ERROR_PREFIX, "") + str(exc)) from None
        except ValueError as exc:
            raise click.UsageError(str(exc), ctx) from None
        except OSError as exc:
            out = ctx.meta.get(OUTPUT_DIR, ctx.params.get("out"))
            raise write_failed(exc, out) from None


class Group(click.Group):
    """A group whose commands (and subgroups' commands) are :class:`Command`."""

    command_class = Command
    group_class = type  # subgroups are of this class too


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


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a command's user sees it: one line on stderr, without the source line."""
    text = str(message).strip().splitlines()
    click.echo(f"Warning: {text[0] if text else category.__name__}", err=True)


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
    from ncfast.report.runs import load_run

    runs = [load_run(p) for p in run_dirs]
    check_output_dir(out)
    return runs
