"""``ncfast analyze CHECKPOINT.pt``: measure a trained network and report what HPD22 reports."""

from __future__ import annotations

from pathlib import Path

import click

from ncfast.cli import main
from ncfast.cli._shared import OUTPUT_DIR, check_output_dir, figure_formats_option


@main.command("analyze")
@click.argument("checkpoint", metavar="CHECKPOINT|RUN_DIR", type=click.Path(path_type=Path))
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder with the dataset files (default: the run's, then $NCFAST_DATA_ROOT).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for report.json, summary.md and figures/ (default: <checkpoint dir>/analysis).",
)
@click.option(
    "--robustness-samples",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Test images attacked with DeepFool (a seeded sample); 0 skips it.",
)
@click.option(
    "--robustness-seed",
    type=click.IntRange(min=0, max=2**63 - 1),
    default=0,
    show_default=True,
    help="Seed of that sample.",
)
@click.option(
    "--device",
    default=None,
    help="cpu, cuda or cuda:N (default: cuda when available).",
)
@click.option(
    "--stats-precision",
    type=click.Choice(["exact", "fast", "auto"]),
    default=None,
    help="Precision of the per-batch scatter product (docs/precision.md; default: the run's).",
)
@figure_formats_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze_command(
    checkpoint: Path,
    data_root: Path | None,
    out: Path | None,
    robustness_samples: int,
    robustness_seed: int,
    device: str | None,
    stats_precision: str | None,
    formats: tuple[str, ...],
    quiet: bool,
) -> None:
    """Load CHECKPOINT (or RUN_DIR/checkpoint.pt; safely: weights only), rebuild its network
    and data, measure every NC quantity on the training and test sets, DeepFool robustness and
    the central-path fit; write report.json, summary.md and the run's figures, and print a
    compact table."""
    from ncfast.paper.analyze import analyze
    from ncfast.report.runs import ANALYSIS_DIR, CHECKPOINT_FILE
    from ncfast.report.summary import format_table

    if checkpoint.is_dir():  # a run directory: its checkpoint
        if not (checkpoint / CHECKPOINT_FILE).is_file():
            raise click.UsageError(
                f"CHECKPOINT: {checkpoint} is a directory without a {CHECKPOINT_FILE} (give a "
                "checkpoint file, or a run directory written by ncfast train)"
            )
        checkpoint = checkpoint / CHECKPOINT_FILE
    report_dir = out if out is not None else checkpoint.parent / ANALYSIS_DIR
    click.get_current_context().meta[OUTPUT_DIR] = report_dir
    # Name --out only where the user gave it: the default is the run's own folder.
    option = "--out" if out is not None else "the run's analysis folder (give --out DIR)"
    if checkpoint.is_file():  # else analyze() says what is wrong with it
        check_output_dir(report_dir, option)
        # The analysis is written beside it first, then swapped in.
        check_output_dir(report_dir.parent, option)
    report = analyze(
        checkpoint,
        data_root=data_root,
        out_dir=out,
        robustness_samples=robustness_samples,
        device=device,
        robustness_seed=robustness_seed,
        formats=formats,
        progress=not quiet,
        stats_precision=stats_precision,
    )
    click.echo(format_table(report), nl=False)
    files = report["files"]
    click.echo(f"written: {files['report']}, {files['summary']}, {len(files['figures'])} figures")
