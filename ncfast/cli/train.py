"""``ncfast train``: the paper's experiment with Neural Collapse measured in the loop."""

from __future__ import annotations

import click

from ncfast.cli import main
from ncfast.cli._shared import ERROR_PREFIX
from ncfast.paper.config import MAX_EPOCHS, MAX_SEED, PRESETS, TrainConfig
from ncfast.paper.data import DATASETS
from ncfast.paper.distributed import DistributedError, torchrun_environment
from ncfast.paper.losses import LOSSES, parse_mse_scale
from ncfast.paper.models import FAMILIES, NETS
from ncfast.paper.rundir import check_tensorboard
from ncfast.paper.train import train
from ncfast.paper.training_state import resume_config


def _int_list(ctx, param, value):
    """'116,233' -> (116, 233); 'none' -> () (no decay, no measurement); for --measure-epochs
    also 'all' (every epoch). An empty list or item is an error, never "none" by accident."""
    if value is None:
        return None
    word = value.strip().lower()
    if word == "none":
        return () if param.name == "lr_milestones" else word
    if word == "all" and param.name == "measure_epochs":
        return word
    items = [v.strip() for v in value.split(",")]
    if not all(items) or not all(v.lstrip("+").isdigit() for v in items):
        raise click.BadParameter(
            f"expected comma-separated epochs such as '116,233' (or 'none'), got {value!r}"
        )
    return tuple(int(v) for v in items)


@main.command("train")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="Named settings: 'demo' (embedded MNIST subset, minutes on a CPU) or 'paper' "
    "(SPEC §6). Explicit options override them.",
)
@click.option(
    "--dataset",
    type=click.Choice(sorted(DATASETS)),
    default=None,
    help="Dataset; mnist5k is embedded and needs no files.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the dataset files in torchvision's layout "
    "(default $NCFAST_DATA_ROOT or ~/.cache/ncfast/data).",
)
@click.option(
    "--download",
    is_flag=True,
    default=None,
    help="Download missing dataset files first (needs a network).",
)
@click.option(
    "--per-class",
    type=click.IntRange(min=1),
    default=None,
    help="Training images per class (default min(5000, rarest class)).",
)
@click.option(
    "--net",
    type=click.Choice(sorted(NETS) + list(FAMILIES)),
    default=None,
    help="Network, or a family (vgg, resnet, densenet) for the paper's depth on this "
    "dataset (HPD22 Table A.2). Default: resnet.",
)
@click.option("--width", type=float, default=None, help="Channel width multiplier (default 1).")
@click.option("--loss", type=click.Choice(LOSSES), default=None, help="Loss (default mse).")
@click.option(
    "--mse-scale",
    default=None,
    metavar="K,M",
    help="Hui & Belkin's scaling for --loss mse-rescaled, e.g. '1,15'.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1, max=MAX_EPOCHS),
    default=None,
    help="Epochs (default 350).",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Learning rate (default: SPEC §6's reference, 0.0184 for mse, 0.0679 for ce).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="SGD batch size (default 128); under torchrun the global batch, shared equally by "
    "the processes (it must be divisible by their number).",
)
@click.option("--weight-decay", type=float, default=None, help="SGD weight decay (default 5e-4).")
@click.option("--momentum", type=float, default=None, help="SGD momentum, in [0, 1] (default 0.9).")
@click.option(
    "--lr-milestones",
    callback=_int_list,
    default=None,
    metavar="E1,E2,...|none",
    help="Epochs after which the learning rate is multiplied by --lr-gamma "
    "(default epochs//3, 2·epochs//3; none: a constant learning rate).",
)
@click.option("--lr-gamma", type=float, default=None, help="Learning-rate decay (default 0.1).")
@click.option(
    "--measure-epochs",
    callback=_int_list,
    default=None,
    metavar="E1,E2,...|all|none",
    help="Epochs to measure (default: SPEC §6's 50 epochs scaled to --epochs).",
)
@click.option(
    "--measure-batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Batch size of the measurement passes, per process (default 500).",
)
@click.option(
    "--online-every",
    type=click.IntRange(min=0),
    default=None,
    metavar="K",
    help="Also measure Neural Collapse from the training passes themselves every K SGD steps "
    "(rows of split train_online: NC1-NC3, the MSE decomposition, SNR, and NC4 against the "
    "previous window's class means; no extra forward pass, train-mode batch norm and moving "
    "weights). Default 0: off (8 with --preset demo).",
)
@click.option(
    "--robustness-samples",
    type=click.IntRange(min=0),
    default=None,
    help="DeepFool robustness (HPD22 Fig. 9) of this many seeded test images at each "
    "measurement, logged as 'robustness' (default 0: off; 100 with --preset paper).",
)
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR|none",
    help="Also log every scalar to TensorBoard in DIR (needs the tensorboard extra). With "
    "--resume the run's folder is the default; none turns the logging off.",
)
@click.option(
    "--sync-batchnorm/--no-sync-batchnorm",
    default=None,
    help="Under torchrun: batch norm over the global batch, as one process would (default), "
    "or over each process's share.",
)
@click.option(
    "--stop-after",
    type=click.IntRange(min=1, max=MAX_EPOCHS),
    default=None,
    metavar="EPOCH",
    help="Stop after this epoch with a checkpoint; continue later with --resume "
    "(e.g. jobs with a time limit).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (default runs/<dataset>-<net>-<loss>-seed<seed>).",
)
@click.option(
    "--resume",
    is_flag=True,
    default=False,
    help="Continue the run in --out from its checkpoint, with its options.",
)
@click.option("--overwrite", is_flag=True, default=False, help="Replace a run already in --out.")
@click.option("--device", default=None, help="cpu or cuda (default cuda if available).")
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=MAX_SEED),
    default=None,
    help="Random seed (default 0).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="bf16 autocast for the network; statistics stay float64 (default fp32).",
)
@click.option(
    "--stats-precision",
    type=click.Choice(["exact", "fast", "auto"]),
    default=None,
    help="Precision of the per-batch scatter product: exact (float64), fast (IEEE float32 "
    "products of class-centred rows added into float64; docs/precision.md) or auto (exact on "
    "CPUs and GPUs with fast float64, fast on others; default).",
)
@click.option(
    "--measure-overhead",
    is_flag=True,
    default=None,
    help="Time plain forward passes at each measurement and print the measurement's "
    "cost beyond them next to the epoch's.",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="Channels-last activations (default on: faster on CUDA and oneDNN CPUs).",
)
@click.option("--quiet", is_flag=True, default=False, help="No progress bar or summaries.")
def train_command(preset, resume, overwrite, quiet, measure_epochs, **options) -> None:
    """Train a network with Neural Collapse measured at the measurement epochs.

    Writes config.json, metrics.jsonl (one line per measured epoch and split, and with
    --online-every K one line every K SGD steps) and checkpoint.pt to --out.

    Several processes (one per GPU with NCCL, or gloo on the CPU): start the same command
    with torchrun (`torchrun --nproc_per_node=K -m ncfast train ...`, or
    `torchrun --nproc_per_node=K --no-python ncfast train ...`). --batch-size stays the
    global batch, so the run matches a one-process run up to rounding; a run may resume with
    any number of processes that divides the batch.

    \b
    Examples:
      ncfast train --preset demo          # embedded MNIST subset, minutes on 2 CPU cores
      ncfast train --preset demo --online-every 8   # NC every 8 SGD steps, for free
      ncfast train --dataset svhn --net vgg13 --loss mse --data-root DIR
      ncfast train --resume --out runs/svhn-vgg13-mse-seed0
      torchrun --nproc_per_node=4 -m ncfast train --dataset cifar10 --net resnet --data-root DIR
    """
    config = _config(preset, resume, overwrite, measure_epochs, options)
    resolved = config.resolved()  # option errors before anything is loaded
    processes = _processes()
    if resolved.batch_size % processes:
        raise click.UsageError(
            f"--batch-size {config.batch_size} is the global batch and must be divisible "
            f"by the number of processes ({processes})"
        )
    if config.tensorboard is not None:
        try:
            check_tensorboard()
        except ImportError as err:
            raise click.UsageError(str(err)) from None
    if processes > 1:
        click.get_current_context().meta[ERROR_PREFIX] = f"rank {_rank()}: "
    out = train(config, progress=not quiet)
    if not quiet and _rank() == 0:
        click.echo(f"run written to {out}/ (config.json, metrics.jsonl, checkpoint.pt)")


def _config(preset, resume: bool, overwrite: bool, measure_epochs, options: dict) -> TrainConfig:
    """The run's TrainConfig from the command line (with --resume: the stored one, with the
    options given now on top)."""
    if options["mse_scale"] is not None:
        options["mse_scale"] = _parse_scale(options["mse_scale"])
    options["measure_epochs"] = measure_epochs
    if options["dataset"] is None and preset is None and not resume:
        raise click.UsageError(
            f"give --dataset (one of {', '.join(sorted(DATASETS))}) or --preset "
            f"({', '.join(sorted(PRESETS))})"
        )
    if options["tensorboard"] is not None and options["tensorboard"].strip().lower() == "none":
        options["tensorboard"] = _NO_TENSORBOARD
    if resume:
        return _resumed(preset, options)
    if options["tensorboard"] is _NO_TENSORBOARD:
        options["tensorboard"] = None
    return TrainConfig.from_preset(preset, overwrite=overwrite, **options)


# --tensorboard none: no logging, also where the resumed run logged.
_NO_TENSORBOARD = object()


def _processes() -> int:
    """The number of processes of this torchrun job (1 outside torchrun)."""
    try:
        env = torchrun_environment()
    except DistributedError as err:
        raise click.UsageError(str(err)) from None
    return 1 if env is None else env[1]


def _rank() -> int:
    env = torchrun_environment()
    return 0 if env is None else env[0]


def _parse_scale(text: str) -> tuple[float, float]:
    try:
        return parse_mse_scale(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--mse-scale") from None


def _resumed(preset, options) -> TrainConfig:
    """The stored configuration of the run in --out, with the options given now on top (the
    library refuses a resumption whose options differ in anything but runtime settings)."""
    out = options["out"] or PRESETS.get(preset, {}).get("out")
    if out is None:
        if options["dataset"] is None:
            raise click.UsageError("--resume needs --out (the run directory to continue)")
        out = TrainConfig.from_preset(preset, **{**options, "tensorboard": None}).resolved().out
    tensorboard_off = options["tensorboard"] is _NO_TENSORBOARD
    if tensorboard_off:
        options = {**options, "tensorboard": None}
    return resume_config(out).merged_for_resume(options, out, tensorboard_off=tensorboard_off)
