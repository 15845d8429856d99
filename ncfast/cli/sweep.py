"""``ncfast sweep``: HPD22's grid of runs in one resumable command
(see :mod:`ncfast.paper.sweep`)."""

from __future__ import annotations

from pathlib import Path

import click

from ncfast.cli import main
from ncfast.cli._shared import figure_formats_option


@main.command(
    "sweep",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True},
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sweep directory: sweep.json, runs/<run>/, selected.json, report/.",
)
@click.option(
    "--preset",
    type=click.Choice(["paper"]),
    default=None,
    help="HPD22's grid: 5 datasets × vgg,resnet,densenet × mse,ce × 25 learning rates in "
    "[1e-4, 0.25], each run `ncfast train --preset paper`. Grid options override it.",
)
@click.option("--datasets", default=None, help="Comma-separated datasets, e.g. mnist,cifar10.")
@click.option(
    "--nets",
    default=None,
    help="Comma-separated networks or families; a family (vgg, resnet, densenet) is HPD22's "
    "depth for each dataset (Table A.2). Default: vgg,resnet,densenet.",
)
@click.option("--losses", default=None, help="Comma-separated losses (default mse,ce).")
@click.option(
    "--lrs",
    default=None,
    metavar="LR,LR,...|logspace:LO,HI,N",
    help="Learning rates (default logspace:1e-4,0.25,25, HPD22's sweep).",
)
@click.option("--seeds", default=None, help="Comma-separated seeds (default 0).")
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm", "submitit-local"]),
    default="local",
    show_default=True,
    help="local: this machine's GPUs or CPU slots; slurm: one array job via submitit; "
    "submitit-local: the slurm path with local processes (to try it out).",
)
@click.option(
    "--jobs",
    type=int,
    default=None,
    help="Runs at once on the CPU (default 1); with GPUs see --runs-per-gpu.",
)
@click.option(
    "--runs-per-gpu",
    type=int,
    default=1,
    show_default=True,
    help="Runs at once on each GPU (small networks).",
)
@click.option(
    "--gpus",
    default=None,
    metavar="ID,ID,...",
    help="GPUs to use (default: all visible ones).",
)
@click.option("--partition", default=None, help="Slurm partition.")
@click.option(
    "--time",
    "time_limit",
    default="24:00:00",
    show_default=True,
    help="Slurm time limit per job ([D-]HH:MM:SS or minutes); a run that needs longer is "
    "requeued and resumes from its checkpoint.",
)
@click.option("--gpus-per-run", type=int, default=None, help="GPUs per Slurm job (default 1).")
@click.option("--cpus-per-run", type=int, default=None, help="CPUs per Slurm job.")
@click.option("--mem-gb", type=float, default=None, help="Memory per Slurm job (GB).")
@click.option(
    "--slurm-option",
    "slurm_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A submitit Slurm parameter (array_parallelism, account, qos, constraint, ...) or "
    "else an sbatch option --KEY=VALUE; repeat for several.",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    help="Slurm: wait for the jobs with a progress bar, then write the report (default), or "
    "return once they are submitted.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=None,
    metavar="EPOCHS",
    help="Train each run in --stop-after segments of EPOCHS epochs, each ending with a "
    "checkpoint (a job killed at its time limit loses at most that much).",
)
@click.option("--retry-failed", is_flag=True, help="Start the failed runs again (resuming).")
@click.option(
    "--download", is_flag=True, help="Download missing dataset files once, before the runs."
)
@click.option("--no-report", is_flag=True, help="Do not write selected.json and report/.")
@click.option("--no-progress", is_flag=True, help="A line per finished run, no progress bar.")
@figure_formats_option
@click.option(
    "--status",
    "status_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Print the done / running / failed / waiting counts of the sweep in DIR and exit.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Select the learning rates and write the report from the runs finished in DIR "
    "(none are started) and exit.",
)
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def sweep_command(
    out,
    preset,
    datasets,
    nets,
    losses,
    lrs,
    seeds,
    executor,
    jobs,
    runs_per_gpu,
    gpus,
    partition,
    time_limit,
    gpus_per_run,
    cpus_per_run,
    mem_gb,
    slurm_options,
    wait,
    checkpoint_every,
    retry_failed,
    download,
    no_report,
    no_progress,
    formats,
    status_dir,
    report_dir,
    train_args,
) -> None:
    """Train a grid of runs (HPD22's sweep) and pick each (dataset, network, loss)'s best
    learning rate.

    Any other option is an option of `ncfast train`, given to every run (e.g. --epochs 2
    --width 0.25 --data-root DIR; after `--` if it clashes with one of these). The grid goes to
    DIR/sweep.json, each run to DIR/runs/<dataset>-<net>-<loss>-lr<lr>-seed<seed>. Rerunning
    the command skips finished runs, resumes killed ones and starts the rest; a failed run is
    recorded (DIR/runs/<run>/sweep_status.json) and does not stop the others. At the end:
    DIR/selected.json (lowest final test error; ties: the smaller lr) and DIR/report/ (Table 1,
    the Figs. 2-12 grid over the selected runs, lr_sweep: final test error against lr).

    \b
    Examples:
      ncfast sweep --preset paper --out sweeps/paper --data-root DATA          # GPUs here
      ncfast sweep --preset paper --out sweeps/paper --data-root DATA \\
          --executor slurm --partition gpu --time 24:00:00 --checkpoint-every 25
      ncfast sweep --out sweeps/tiny --datasets mnist5k --nets vgg --lrs 0.01,0.05 \\
          --jobs 2 --epochs 2 --width 0.0625 --per-class 5 --device cpu
      ncfast sweep --status sweeps/paper
    """
    from ncfast.paper.sweep import Grid, SlurmOptions, Sweep, SweepError, SweepOptions

    grid_options = {
        key: value
        for key, value in (
            ("datasets", datasets),
            ("nets", nets),
            ("losses", losses),
            ("lrs", lrs),
            ("seeds", seeds),
        )
        if value is not None
    }
    try:  # the sweep's setup errors are about its options: usage errors
        if status_dir is not None or report_dir is not None:
            if grid_options or preset or train_args or out is not None:
                raise click.UsageError(
                    "--status/--report read the grid from DIR/sweep.json; give no other option"
                )
            _status_or_report(status_dir, report_dir, formats)
            return
        if out is None:
            raise click.UsageError("give --out DIR (the sweep directory)")
        options = SweepOptions(
            executor=executor,
            jobs=jobs,
            runs_per_gpu=runs_per_gpu,
            gpus=None if gpus is None else tuple(g.strip() for g in gpus.split(",")),
            slurm=SlurmOptions(
                partition=partition,
                time=time_limit,
                gpus_per_run=gpus_per_run,
                cpus_per_run=cpus_per_run,
                mem_gb=mem_gb,
                options=tuple(slurm_options),
            ),
            wait=wait,
            checkpoint_every=checkpoint_every,
            retry_failed=retry_failed,
            download=download,
            progress=not no_progress,
        )
        options.check()  # before the grid is resolved or anything is read or written
        train_preset, train_options = read_train_args(train_args)
        grid = Grid.from_command(preset, grid_options, train_preset, train_options)
        sweep = Sweep(out, grid, read_train_args=read_train_args)
        counts = sweep.run(options, echo=click.echo)
    except SweepError as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException(
            "interrupted; the same command continues the sweep (finished runs are kept, "
            "stopped ones resume from their checkpoints)"
        ) from None
    click.echo(
        f"done {counts['done']}, failed {counts['failed']}, running {counts['running']}, "
        f"queued {counts['queued']}, waiting {counts['waiting']} (of {len(sweep.specs)})"
    )
    if no_report or counts["done"] == 0:
        return
    if counts["waiting"] or counts["running"] or counts["queued"]:
        click.echo(
            f"report left for later: runs are unfinished (`ncfast sweep --report {sweep.out}`)"
        )
        return
    _report(sweep, formats)


def read_train_args(words) -> tuple[str | None, dict]:
    """``ncfast train`` options (command-line words, given to every run) as ``(preset,
    TrainConfig fields)``, read with that command's own parser (one grammar for both); the
    library checks them (:func:`ncfast.paper.sweep.check_train_options`). SweepError naming
    the option when they do not parse."""
    from ncfast.cli.train import train_command
    from ncfast.paper.sweep import SweepError, check_train_options

    try:
        ctx = train_command.make_context("ncfast train", list(words), resilient_parsing=False)
    except click.ClickException as exc:
        raise SweepError(f"train option: {exc.format_message()}") from None
    params = dict(ctx.params)
    preset = params.pop("preset")
    return check_train_options(preset, params)


def _status_or_report(status_dir: Path | None, report_dir: Path | None, formats) -> None:
    """``--status DIR``: print the counts; ``--report DIR``: select and write the report."""
    from ncfast.paper.sweep import Sweep

    if status_dir is not None and report_dir is not None:
        raise click.UsageError("give --status DIR or --report DIR, not both")
    if status_dir is not None:
        click.echo(
            Sweep(status_dir, option="--status", read_train_args=read_train_args).status_text()
        )
    else:
        sweep = Sweep(report_dir, option="--report", read_train_args=read_train_args)
        _report(sweep, formats)


def _report(sweep, formats) -> None:
    """Select the learning rates and write the report; print the selection. A SweepError here
    (nothing finished) is the run's, not the options': exit code 1."""
    from ncfast.paper.sweep import SweepError

    try:
        selection = sweep.select()
        paths = sweep.report(formats, selection)
    except SweepError as exc:
        raise click.ClickException(str(exc)) from None
    for entry in selection["selected"]:
        where = f"{entry['dataset']} {entry['net']} {entry['loss']}"
        if entry["lr"] is None:
            click.echo(f"{where}: no finished run")
        else:
            click.echo(f"{where}: lr {entry['lr']:.4g} (test error {entry['test_error']:.4f})")
    click.echo(
        f"selected: {sweep.out / 'selected.json'}; report: {len(paths)} files in "
        f"{sweep.out / 'report'}"
    )
