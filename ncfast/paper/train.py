"""Training with Neural Collapse measured in the loop (the paper's protocol, SPEC §6).

``train(TrainConfig(...))`` trains one network on one dataset and, at the measurement epochs,
measures the training and test splits with :func:`ncfast.paper.evaluate.measure_split` (eval mode,
streamed, nothing per-sample kept). It writes, in the run directory ``out``:

- ``config.json``: the resolved configuration (every default filled in),
- ``metrics.jsonl``: one flat JSON object per measured epoch and split: ``epoch``, ``split``
  (``train``/``test``), ``lr`` (of that epoch), ``sgd_loss``/``sgd_error`` (running means over
  the epoch's SGD steps, train mode), ``wall_time`` (seconds since the run began, across
  resumptions), ``epoch_time`` (the epoch's training), ``measure_time`` (this split's
  measurement), ``forward_time`` (with ``measure_overhead``), and every key of
  :func:`ncfast.paper.evaluate.measure_split` (``error``, ``loss``, all SPEC §2–§4 keys with λ as
  ``weight_decay``; ``snr_singular_values`` a list),
- ``checkpoint.pt``: model, optimiser, scheduler, RNG states, config and metrics history
  (see :mod:`ncfast.paper.checkpoint`), rewritten atomically after each measurement and at the end,
  before that epoch's lines are appended to the log (a resumption rewrites the log from it).

The run directory belongs to one run at a time (:class:`ncfast.paper.rundir.RunDirectory`): it is
created and locked before any data is loaded (an unusable ``out`` is the first error), another
run or resumption of it meanwhile is refused naming the owner's PID, and ``overwrite`` removes
the old run's files before the new run writes anything. Training that diverges (a non-finite
training loss or weight, checked on the device once per epoch with the epoch's one host
synchronisation, or non-finite eval-mode outputs before a measurement or checkpoint) stops with
:class:`TrainingDivergedError` and keeps the last checkpoint, which predates it.

An epoch is a permutation of the training indices drawn from a generator seeded with
``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one; on the CPU it
reproduces the same metrics exactly. Training draws no other random numbers after the network's
seeded initialisation (no dropout, no augmentation); the checkpoint still carries the RNG states.

Several processes (``torchrun --nproc_per_node=K -m ncfast train ...``, see
:mod:`ncfast.paper.distributed`): ``batch_size`` is the *global* batch, as in the paper's protocol;
each process takes a contiguous ``batch_size / K`` of every global batch of the same seeded
permutation (an error if K does not divide it), the model is wrapped in
DistributedDataParallel with batch norm over the global batch (``sync_batchnorm``), and the
losses are scaled so that the averaged gradient is the global batch's. The run is then the
single-process run up to floating-point summation order. Measurement: each process streams its
contiguous share of each split and the statistics are combined exactly
(``Measurement.compute(distributed=True)``); ``measure_batch_size`` is per process. Only rank 0
writes files, prints and runs DeepFool; every rank reads the checkpoint on resume. The
checkpoint does not depend on the number of processes: a run may resume with any number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ncfast import __version__
from ncfast.errors import NCFastError
from ncfast.integrations.tensorboard import log_to_tensorboard
from ncfast.metrics import mse_lambda
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.paper import distributed as dist_utils
from ncfast.paper.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_state_checked
from ncfast.paper.evaluate import check_precision, measure_split, network_autocast, split_features
from ncfast.paper.losses import check_loss, compute_loss
from ncfast.paper.models import FAMILIES, NETS, build, paper_net
from ncfast.paper.robustness import robustness
from ncfast.paper.rundir import (
    RunDirectory,
    RunDirectoryError,
    check_writable_dir,
)
from ncfast.stats import InvalidInputError

# Seeds are 63-bit (they reach torch generators and JSON as int64).
MAX_SEED = 2**63 - 1
# SGD multiplies float32 weights by these: larger ones cannot even be represented.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# SPEC §6: the paper's 50 measurement epochs of a 350-epoch run.
PAPER_EPOCHS = 350
PAPER_MEASURE_EPOCHS = (
    *range(1, 15),
    *(16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77, 85, 92),
    *(101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350),
)

# SPEC §6: reference learning rates (MNIST-ResNet18) used when --lr is not given.
REFERENCE_LR = {"mse": 0.0184, "mse-rescaled": 0.0184, "ce": 0.0679}

# Keys of a metrics row besides those of measure_split (and, on test rows at a run with
# robustness_samples > 0, those of ncfast.paper.robustness.robustness plus "robustness_time").
TIME_KEYS = ("wall_time", "epoch_time", "measure_time")
ROW_KEYS = ("epoch", "split", "lr", "sgd_loss", "sgd_error", "world_size", *TIME_KEYS)
# Of the robustness() result, the keys logged (seed and overshoot are the run's settings).
ROBUSTNESS_KEYS = (
    "robustness",
    "robustness_median",
    "robustness_stderr",
    "robustness_correct",
    "robustness_tight",
    "robustness_tight_median",
    "robustness_tight_stderr",
    "robustness_tight_scale_median",
    "robustness_out_of_range",
    "robustness_samples",
    "robustness_correct_samples",
    "robustness_not_fooled",
    "robustness_mean_iterations",
)

# Named settings; explicit options override them.
# - "paper": SPEC §6 as is (the defaults; --net may be a family, resolved through Table A.2).
# - "demo": the README's first command, a few minutes on 2 CPU cores. The embedded MNIST subset
#   (4,000 training images), a quarter-width VGG11, every epoch measured. To fit the terminal
#   phase into 70 epochs it trains with 10× the paper's weight decay (collapse speed grows with
#   lr·wd) and decays the learning rate at epochs 50 and 60, after training error has reached 0:
#   NC1 then falls by more than 10× from the zero-error epoch to the end (14× to 27× over seeds
#   0-2 on the machine it was tuned on).
# - "paper" also attacks a modest seeded sample of test images with DeepFool at each
#   measurement (seed Fig. 9).
PRESETS: dict[str, dict] = {
    "paper": {"robustness_samples": 100},
    "demo": {
        "dataset": "mnist5k",
        "net": "vgg11",
        "width": 0.25,
        "loss": "mse",
        "epochs": 70,
        "lr": 0.05,
        "weight_decay": 5e-3,
        "lr_milestones": (50, 60),
        "batch_size": 128,
        "measure_epochs": "all",
        "out": "runs/demo",
    },
}


@dataclass
class TrainConfig:
    """Every option of ``ncfast train``; ``None`` means "the default for this run" (filled in by
    :meth:`resolved`). Defaults are the paper's protocol (SPEC §6)."""

    dataset: str = "mnist5k"
    # A name of ncfast.paper.models.NETS, or a family (vgg, resnet, densenet): the depth the paper
    # used
    # for the dataset (seed Table A.2).
    net: str = "resnet"
    out: str | None = None  # run directory; default runs/<dataset>-<net>-<loss>-seed<seed>
    data_root: str | None = None
    download: bool = False
    per_class: int | None = None  # None: the dataset's SPEC §6 default
    width: float = 1.0
    loss: str = "mse"
    mse_scale: tuple[float, float] | None = None  # (k, M) for loss mse-rescaled
    epochs: int = PAPER_EPOCHS
    lr: float | None = None  # None: REFERENCE_LR[loss]
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lr_milestones: tuple[int, ...] | None = None  # None: (epochs // 3, 2 * epochs // 3)
    lr_gamma: float = 0.1
    # None: SPEC §6's epochs scaled to `epochs`; also "all" or "none".
    measure_epochs: tuple[int, ...] | str | None = None
    measure_batch_size: int = 500
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    precision: str = "fp32"
    # Channels-last activations: faster convolutions on CUDA and on oneDNN CPUs (~30% here).
    channels_last: bool = True
    measure_overhead: bool = False
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    # DeepFool robustness (seed Fig. 9) of this many seeded test images at each measurement
    # epoch, logged on the test row as "robustness"; 0: off.
    robustness_samples: int = 0
    # With several processes: batch norm over the global batch (as one process would), not
    # over each process's share.
    sync_batchnorm: bool = True
    tensorboard: str | None = None  # a folder: every logged scalar also goes to TensorBoard
    # Stop after this epoch with a checkpoint (continue later with resume), e.g. for jobs with
    # a time limit; None: run to the end.
    stop_after: int | None = None
    preset: str | None = None
    resume: bool = False
    overwrite: bool = False

    # Options that may differ between a run and its resumption.
    RUNTIME_FIELDS = (
        "out",
        "resume",
        "overwrite",
        "measure_overhead",
        "device",
        "data_root",
        "download",
        "memory_budget_bytes",
        "robustness_samples",
        "tensorboard",
        "stop_after",
    )

    @classmethod
    def from_preset(cls, preset: str | None = None, **options) -> TrainConfig:
        """A config from the named preset, with ``options`` (those not None) on top."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = dict(PRESETS.get(preset, {}))
        values.update({k: v for k, v in options.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown training option(s): {unknown}")
        return cls(preset=preset, **values)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and every value checked (ValueError
        naming the option otherwise)."""
        c = dataclasses.replace(self)
        if c.net in FAMILIES:
            c.net = paper_net(c.dataset, c.net)
        if c.net not in NETS:
            raise ValueError(
                f"net must be one of {sorted(NETS)} or a family {list(FAMILIES)}, got {c.net!r}"
            )
        scale = check_loss(c.loss, c.mse_scale)
        c.mse_scale = None if scale is None else tuple(scale)
        if scale is not None and scale[0] * max(1.0, scale[1]) ** 2 > FLOAT32_MAX:
            raise ValueError(
                f"mse_scale: k·M² must stay within float32's range ({FLOAT32_MAX:.4g}): the "
                f"loss is computed in float32; got k={scale[0]:g}, M={scale[1]:g}"
            )
        check_precision(c.precision)
        _check_int(c.epochs, "epochs", 1)
        _check_int(c.batch_size, "batch_size", 1)
        _check_int(c.measure_batch_size, "measure_batch_size", 1)
        _check_int(c.seed, "seed", 0, MAX_SEED)
        _check_int(c.robustness_samples, "robustness_samples", 0)
        if c.stop_after is not None:
            _check_int(c.stop_after, "stop_after", 1)
            if c.stop_after > c.epochs:
                raise ValueError(
                    f"stop_after must be an epoch in 1..{c.epochs} (--epochs), got {c.stop_after}"
                )
        if not isinstance(c.sync_batchnorm, bool):
            raise ValueError(f"sync_batchnorm must be True or False, got {c.sync_batchnorm!r}")
        if c.per_class is not None:
            _check_int(c.per_class, "per_class", 1)
        _check_positive(c.width, "width")
        if c.lr is None:
            c.lr = REFERENCE_LR[c.loss]
        _check_positive(c.lr, "lr", FLOAT32_MAX)
        for name in ("weight_decay", "momentum"):
            value = getattr(c, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0 <= value <= FLOAT32_MAX
            ):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        _check_positive(c.lr_gamma, "lr_gamma", FLOAT32_MAX)
        if c.lr_milestones is None:
            c.lr_milestones = tuple(m for m in (c.epochs // 3, 2 * c.epochs // 3) if m >= 1)
        c.lr_milestones = _epoch_list(c.lr_milestones, "lr_milestones", c.epochs)
        if c.lr * max(1.0, c.lr_gamma) ** len(c.lr_milestones) > FLOAT32_MAX:
            raise ValueError(
                f"lr_gamma: the learning rate {c.lr:g} grows past float32's range after "
                f"{len(c.lr_milestones)} decays by {c.lr_gamma:g}"
            )
        for name in ("dataset", "out", "data_root", "tensorboard", "device"):
            value = getattr(c, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
        for name in ("download", "channels_last", "measure_overhead", "resume", "overwrite"):
            if not isinstance(getattr(c, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
        _check_int(c.memory_budget_bytes, "memory_budget_bytes", 0)
        if c.measure_epochs is None:
            c.measure_epochs = default_measure_epochs(c.epochs)
        elif c.measure_epochs in ("all", "none"):
            c.measure_epochs = tuple(range(1, c.epochs + 1)) if c.measure_epochs == "all" else ()
        c.measure_epochs = _epoch_list(c.measure_epochs, "measure_epochs", c.epochs)
        if c.device is None:
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", c.device):
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {c.device!r}")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {c.device!r} was asked for but CUDA is not available here")
        if c.out is None:
            c.out = f"runs/{c.dataset}-{c.net}-{c.loss}-seed{c.seed}"
        if c.tensorboard is not None:
            # Absolute, so that a resumption from another working directory logs to the same
            # place (the checkpoint stores it).
            c.tensorboard = os.path.abspath(os.path.expanduser(c.tensorboard))
        shape = _dataset_shape(c.dataset)
        if shape is not None:
            check_model_size(c.net, *shape, c.width, c.device)
        return c

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("mse_scale", "lr_milestones", "measure_epochs"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def measure_options(self) -> dict:
        """The keyword arguments of :func:`ncfast.paper.evaluate.measure_split` this run measures
        with (training and ``ncfast analyze`` must measure alike)."""
        return {
            "loss": self.loss,
            "sgd_weight_decay": self.weight_decay,
            "batch_size": self.measure_batch_size,
            "precision": self.precision,
            "mse_scale": self.mse_scale,
            "memory_budget_bytes": self.memory_budget_bytes,
        }

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        for key in ("mse_scale", "lr_milestones", "measure_epochs"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


class TrainingDivergedError(NCFastError, FloatingPointError):
    """Training produced a non-finite loss, weights or outputs; the run's last checkpoint (one
    from before the divergence) is kept."""


def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f"≥ {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _check_positive(value, name: str, maximum: float = math.inf) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value <= maximum
    ):
        bound = f"in (0, {maximum:.4g}]" if math.isfinite(maximum) else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _dataset_shape(dataset) -> tuple[int, int, int] | None:
    """(classes, channels, image size) of a dataset of the registry (None for others)."""
    from ncfast.paper.data import DatasetError, get_info

    try:
        info = get_info(dataset)
    except DatasetError:
        return None
    return info.num_classes, info.channels, info.image_size


def _device_memory(device: str) -> int | None:
    """Bytes of memory of ``device`` (None where it cannot be told)."""
    try:
        if device.startswith("cuda"):
            index = torch.device(device).index
            return torch.cuda.get_device_properties(
                torch.cuda.current_device() if index is None else index
            ).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def check_model_size(
    net: str, num_classes: int, in_channels: int, image_size: int, width: float, device: str
) -> int:
    """The parameter count of ``net`` at ``width``, counted without allocating it; ValueError
    naming ``width`` when such a network cannot be built or its weights, gradients and
    momentum (float32) would not fit in the memory of ``device``."""
    try:
        with torch.device("meta"):
            model = build(net, num_classes, in_channels, image_size, width)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"width: a {net} of width {width:g} cannot be built ({detail[:120]}); choose a "
            "smaller --width"
        ) from None
    count = sum(p.numel() for p in model.parameters())
    needed = 3 * 4 * count  # float32 weights, gradients and momentum
    available = _device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"width: a {net} of width {width:g} has {count:,} parameters, {needed / 2**30:.1f} "
            f"GiB with their gradients and momentum: more than the {available / 2**30:.1f} GiB "
            f"of memory of {device}; choose a smaller --width"
        )
    return count


def _epoch_list(values, name: str, epochs: int) -> tuple[int, ...]:
    values = tuple(values)
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= epochs:
            raise ValueError(f"{name} must be epochs in 1..{epochs} (--epochs), got {v!r}")
    return tuple(sorted(set(values)))


def default_measure_epochs(epochs: int) -> tuple[int, ...]:
    """SPEC §6's measurement epochs scaled from 350 to ``epochs`` (rounded, deduplicated; the
    last epoch is always measured)."""
    _check_int(epochs, "epochs", 1)
    scaled = {
        min(epochs, max(1, math.floor(e * epochs / PAPER_EPOCHS + 0.5)))
        for e in PAPER_MEASURE_EPOCHS
    }
    return tuple(sorted(scaled | {epochs}))


def epoch_permutation(num_samples: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of the training samples in ``epoch``: a function of (seed, epoch) only."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + epoch) % 2**64)  # the same for seeds < 2**44
    return torch.randperm(num_samples, generator=generator, device=device)


def epoch_batches(num_samples: int, batch_size: int, min_last: int = 2) -> list[tuple[int, int]]:
    """Slices of the permutation (global batches); a last batch of fewer than ``min_last``
    samples is left out (batch norm cannot train on a single sample; those samples are in
    other positions in the next epoch). See :func:`min_last_batch` for several processes."""
    bounds = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds.pop()
    return bounds


def min_last_batch(world_size: int, sync_batchnorm: bool) -> int:
    """The smallest last global batch that trains: 2 samples for batch norm, and with several
    processes at least one per process (batch norm over the global batch) or two per process
    (batch norm over each share). With one process, or any last batch of at least that size,
    the batches are those of the single-process run."""
    if world_size == 1:
        return 2
    return max(2, world_size) if sync_batchnorm else 2 * world_size


def rng_state(device: torch.device | None = None) -> dict:
    """The CPU generator's state and, on a CUDA ``device``, that device's (a one-entry list
    under ``"cuda"``): the training device's generator only, so the checkpoint does not depend
    on how many GPUs or processes the run used."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state(device)]
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state` (every process gets the same states; a CUDA state goes to the
    training ``device``)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Older checkpoints held every visible device's state: take this device's if present.
        own = cuda_states[index] if len(cuda_states) > index else cuda_states[0]
        torch.cuda.set_rng_state(own, device)


def jsonable(metrics: dict) -> dict:
    """Tensors to lists/floats so a metrics dict can go to JSON and to a weights-only checkpoint."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        out[key] = value
    return out


def _metrics_lines(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def load_data(config: TrainConfig):
    """(train, test) :class:`ncfast.paper.data.LabeledImages` on the run's device."""
    from ncfast.paper.data import load_dataset

    return load_dataset(
        config.dataset,
        root=config.data_root,
        per_class=config.per_class,
        download=config.download,
        device=config.device,
        seed=config.seed,
    )


def build_model(config: TrainConfig, num_classes: int, in_channels: int, image_size: int):
    """The run's network, initialised from ``config.seed`` (same weights on CPU and CUDA), in
    the memory format it trains in (channels-last unless ``config.channels_last`` is False)."""
    torch.manual_seed(config.seed)
    model = build(config.net, num_classes, in_channels, image_size, config.width)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _match_state_layout(optimizer) -> None:
    """Give loaded momentum buffers their parameter's memory layout (channels-last on CUDA):
    the fused optimiser walks parameters and buffers as flat memory."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def make_optimizer(model, config: TrainConfig, device: torch.device):
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **extra,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
    )
    return optimizer, scheduler


def resume_config(out: str | os.PathLike) -> TrainConfig:
    """The configuration stored in the checkpoint of the run in ``out`` (RunDirectoryError when
    there is none to resume, CheckpointError when it is unreadable or unusable)."""
    rundir = RunDirectory(out)
    rundir.check_not_in_use()
    rundir.check_resumable()
    return stored_config(load_checkpoint(rundir.checkpoint_path), rundir.checkpoint_path)


def stored_config(payload: dict, path) -> TrainConfig:
    """The TrainConfig of a checkpoint's ``config``, checked like options given now (with this
    machine's device); CheckpointError naming the option otherwise."""
    try:
        config = TrainConfig.from_json(payload["config"])
        dataclasses.replace(config, device="cpu", resume=False, overwrite=False).resolved()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'config' is unusable ({exc})") from None
    return config


def restore_training_state(
    payload: dict, model, optimizer, scheduler, config: TrainConfig, device, path
) -> None:
    """Load a checkpoint's model, optimiser, scheduler and RNG states; a CheckpointError
    naming the field when one does not fit this run's network or schedule."""
    what = f"a {config.net} of width {config.width:g}"
    load_state_checked(model, payload["model"], path, "model", what)
    groups = payload["optimizer"]["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stored_ids = [i for group in groups for i in group["params"]]
    if len(groups) != len(optimizer.param_groups) or len(stored_ids) != len(params):
        raise CheckpointError(
            f"checkpoint {path}: 'optimizer' holds {len(stored_ids)} parameters in "
            f"{len(groups)} group(s); {what} has {len(params)} in {len(optimizer.param_groups)}"
        )
    for index, param in zip(stored_ids, params, strict=True):
        state = payload["optimizer"]["state"].get(index, {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise CheckpointError(
                    f"checkpoint {path}: 'optimizer' state {key} of parameter {index} has shape "
                    f"{list(value.shape)}, the parameter {list(param.shape)}"
                )
    load_state_checked(optimizer, payload["optimizer"], path, "optimizer", "SGD of " + what)
    _match_state_layout(optimizer)
    epoch = payload["epoch"]
    stored = payload["scheduler"]
    if stored.get("last_epoch") != epoch or not isinstance(stored.get("milestones"), dict):
        raise CheckpointError(
            f"checkpoint {path}: 'scheduler' must be the learning-rate schedule after epoch "
            f"{epoch} (last_epoch {epoch} and the milestones), got last_epoch "
            f"{stored.get('last_epoch')!r}"
        )
    try:
        scheduler.load_state_dict(stored)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'scheduler' cannot be loaded ({exc})") from None
    # The learning rate of the next epoch must be the schedule's: lr·γ^(milestones passed).
    expected = config.lr * config.lr_gamma ** sum(m <= epoch for m in config.lr_milestones)
    for group in optimizer.param_groups:
        if not math.isclose(group["lr"], expected, rel_tol=1e-9):
            raise CheckpointError(
                f"checkpoint {path}: 'optimizer'/'scheduler': learning rate {group['lr']:g} "
                f"after epoch {epoch}, the schedule gives {expected:g}"
            )
    try:
        set_rng_state(payload["rng"], device)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path}: 'rng' cannot be restored ({exc})") from None


def _check_same_run(config: TrainConfig, stored: dict, path: Path) -> None:
    mine = config.to_json()
    # Options added to ncfast after the run was started are missing from its checkpoint: they
    # match when they hold their default.
    defaults = TrainConfig().to_json()
    differ = [
        f"{k}: checkpoint {stored.get(k)!r}, now {mine[k]!r}"
        for k in mine
        if k not in TrainConfig.RUNTIME_FIELDS and stored.get(k, defaults[k]) != mine[k]
    ]
    if differ:
        raise RunDirectoryError(
            f"--resume: the options differ from those of the run in {path.parent}: "
            + "; ".join(differ)
        )


def _summary(epoch: int, rows: list[dict]) -> str:
    parts = [f"epoch {epoch:4d}"]
    for row in rows:
        parts.append(
            f"{row['split']}: err {row['error']:.4f} loss {row['loss']:.4g} "
            f"nc1 {row['nc1']:.3g} nc4 {row.get('nc4_ncc_mismatch', float('nan')):.3g}"
        )
    parts.append(f"measured in {sum(r['measure_time'] for r in rows):.1f} s")
    return " | ".join(parts)


def _forward_time(model, data, config: TrainConfig, channels_last: bool, bounds=None) -> float:
    """Seconds for a plain eval-mode forward pass over ``data`` (or this process's share
    ``bounds``): the measurement's floor."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = torch.zeros((), device=data.device)
    for h, _ in split_features(
        model, data, config.measure_batch_size, config.precision, channels_last, bounds
    ):
        with torch.no_grad():
            total += model.classifier(h).sum()
    float(total)  # waits for the device
    model.train(was_training)
    return time.perf_counter() - start


def check_tensorboard() -> None:
    """ImportError naming the optional extra when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'ncfast[tensorboard]' (or pip install tensorboard)"
        ) from None


def tensorboard_scalars(row: dict) -> dict:
    """The numbers of a metrics row (every key but ``epoch`` and ``split``)."""
    return {k: v for k, v in row.items() if k not in ("epoch", "split")}


def train(config: TrainConfig, progress: bool = True, data=None) -> Path:
    """Run (or with ``config.resume``, continue) the training of ``config``; returns the run
    directory. ``data``: an optional ``(train, test)`` pair of
    :class:`ncfast.paper.data.LabeledImages` to use instead of loading ``config.dataset``.

    The run directory is locked for the life of the run (:class:`ncfast.paper.rundir.RunDirectory`):
    a second run, or a resumption, of the same directory meanwhile is a RunDirectoryError.
    Training that produces a non-finite loss, weights or outputs stops with a
    :class:`TrainingDivergedError` and keeps the last checkpoint from before.

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process calls this: it
    joins the process group (and leaves it at the end) unless the caller initialised one; see
    the module docstring for how the work is shared.
    """
    config = config.resolved()
    if config.tensorboard is not None:
        check_tensorboard()
    ctx = dist_utils.setup(config.device)
    rundir = RunDirectory(config.out)
    try:
        return _train(config, ctx, progress, data, rundir)
    finally:
        rundir.unlock()
        dist_utils.teardown(ctx)


def _on_main(ctx: dist_utils.DistributedContext, action, what: str) -> None:
    """``action()`` on rank 0 only; a RunDirectoryError or CheckpointError there is raised on
    every rank (a collective with several processes, so no rank waits for a failed one)."""
    error = None
    if ctx.is_main:
        try:
            action()
        except (RunDirectoryError, CheckpointError) as exc:
            error = exc
    if not ctx.all_ok(error is None):
        raise error or RunDirectoryError(f"rank 0 failed to {what} (see its message)")


def _open_run_directory(rundir: RunDirectory, config: TrainConfig) -> None:
    """Lock the run directory (the check that --out is usable) and check it can be used as
    asked: a resumable run for --resume, no run (or --overwrite) otherwise."""
    rundir.lock()
    if config.resume:
        rundir.check_resumable()
    else:
        rundir.check_new_run(config.overwrite)
    if config.tensorboard is not None:
        check_writable_dir(config.tensorboard, "tensorboard")


def _train(
    config: TrainConfig,
    ctx: dist_utils.DistributedContext,
    progress: bool,
    data,
    rundir: RunDirectory,
) -> Path:
    world, rank = ctx.world_size, ctx.rank
    if config.batch_size % world:
        raise dist_utils.DistributedError(
            f"batch_size {config.batch_size} is the global batch and must be divisible by the "
            f"number of processes ({world}): each process trains on batch_size/{world} samples "
            "of every batch"
        )
    progress = progress and ctx.is_main
    out = rundir.path
    # Before anything is loaded: rank 0 locks the directory, every rank learns the outcome.
    _on_main(ctx, lambda: _open_run_directory(rundir, config), f"open the run directory {out}")
    payload = None
    if config.resume:
        payload = load_checkpoint(rundir.checkpoint_path)  # every rank reads it
        _check_same_run(config, payload["config"], rundir.checkpoint_path)
        done = payload["epoch"]
        if config.stop_after is not None and config.stop_after <= done:
            raise RunDirectoryError(
                f"stop_after: the run in {out} has already trained {done} epochs; give "
                f"an epoch in {done + 1}..{config.epochs} (or none to finish the run)"
            )

    device = ctx.device
    if data is None:
        train_data, test_data = load_data(dataclasses.replace(config, device=str(device)))
    else:
        train_data, test_data = (d.to(device) for d in data)
    if train_data.num_classes != test_data.num_classes:
        raise ValueError("the training and test splits have different numbers of classes")
    num_classes = train_data.num_classes
    _, in_channels, height, width = train_data.images.shape
    if height != width:
        raise ValueError(f"images must be square, got {height}×{width}")
    check_model_size(config.net, num_classes, in_channels, height, config.width, str(device))

    model = build_model(config, num_classes, in_channels, height).to(device)
    sync_batchnorm = ctx.enabled and config.sync_batchnorm
    if sync_batchnorm:
        model = dist_utils.convert_sync_batchnorm(model, device)
    channels_last = config.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer, scheduler = make_optimizer(model, config, device)
    history: list[dict] = []
    epoch_times: list[float] = []  # training seconds of every epoch (benchmarks read them)
    start_epoch = 0
    elapsed_before = 0.0
    if payload is not None:
        restore_training_state(
            payload, model, optimizer, scheduler, config, device, rundir.checkpoint_path
        )
        history = list(payload["history"])
        start_epoch = payload["epoch"]
        elapsed_before = float(payload.get("wall_time", 0.0))
        epoch_times = list(payload.get("epoch_times", []))
    # The network that trains: DDP averages the gradients; `model` (the same parameters) is
    # what is measured and saved, so checkpoints hold no wrapper prefixes.
    trained = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    config_record = {
        **config.to_json(),
        "ncfast_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "per_process_batch_size": config.batch_size // world,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": height,
        "train_samples": len(train_data),
        "test_samples": len(test_data),
        "feature_dim": model.feature_dim,
        "lambda": mse_lambda(config.weight_decay, num_classes),
    }

    def start_files() -> None:
        if config.overwrite and not config.resume:
            rundir.clear()  # the old run goes before anything new is written
        rundir.write_config(json.dumps(config_record, indent=2) + "\n")
        # The log always matches the checkpoint: lines a killed run wrote after it are dropped.
        rundir.write_metrics(_metrics_lines(history))

    _on_main(ctx, start_files, f"write to the run directory {out}")
    tensorboard = None
    if ctx.is_main and config.tensorboard is not None:
        from ncfast.integrations.tensorboard import TensorBoardWriter

        # purge_step hides the events a killed run wrote after its checkpoint.
        tensorboard = TensorBoardWriter(
            config.tensorboard, prefix="", purge_step=start_epoch + 1
        ).writer

    measure_kwargs = {
        **config.measure_options(),
        "channels_last": channels_last,
        "distributed": ctx.enabled,
    }
    measure_set = set(config.measure_epochs)
    last_epoch = config.epochs if config.stop_after is None else config.stop_after
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    num_train = len(train_data)
    batches = epoch_batches(
        num_train, config.batch_size, min_last_batch(world, config.sync_batchnorm)
    )
    seen_per_epoch = batches[-1][1]
    run_start = time.perf_counter() - elapsed_before
    last_saved = start_epoch  # the epoch of the checkpoint on disk (0: none)

    def diverged(epoch: int, what: str) -> TrainingDivergedError:
        kept = (
            f"the checkpoint of epoch {last_saved} is kept"
            if last_saved
            else "no checkpoint was written"
        )
        return TrainingDivergedError(
            f"training diverged at epoch {epoch} ({what}); lower --lr (now {config.lr:g}) and "
            f"start again with --overwrite; {kept}"
        )

    def save(epoch: int, rows: list[dict]) -> None:
        """Rank 0: the checkpoint, then the epoch's log lines. The checkpoint comes first: a
        failed write leaves the log as it was, and a resumption rewrites the log from the
        checkpoint's history (so a kill between the two loses nothing)."""
        rundir.save_checkpoint(
            {
                "format": FORMAT,
                "ncfast_version": __version__,
                "epoch": epoch,
                "config": config.to_json(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(device),
                "history": history,
                "wall_time": time.perf_counter() - run_start,
                "epoch_times": epoch_times,
            }
        )
        if rows:
            rundir.append_metrics(_metrics_lines(rows))
            if tensorboard is not None:
                for row in rows:
                    log_to_tensorboard(tensorboard, tensorboard_scalars(row), epoch, row["split"])
                tensorboard.flush()
            if progress or config.measure_overhead:
                tqdm.write(_summary(epoch, rows))
            if config.measure_overhead:
                tqdm.write(_overhead_line(epoch, epoch_times[-1], rows))

    epochs_bar = tqdm(
        range(start_epoch + 1, last_epoch + 1),
        total=config.epochs,
        initial=start_epoch,
        desc=f"{config.dataset}/{config.net}/{config.loss}",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for epoch in epochs_bar:
            trained.train()
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            perm = epoch_permutation(num_train, config.seed, epoch, device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            wrong = torch.zeros((), dtype=torch.int64, device=device)
            for start, stop in tqdm(
                batches, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch"
            ):
                index = dist_utils.shard(perm[start:stop], rank, world)
                x, y = train_data.batch(index, memory_format=memory_format)
                with network_autocast(device, config.precision):
                    logits = trained(x)
                batch_loss = compute_loss(config.loss, logits, y, config.mse_scale)
                scale = dist_utils.loss_scale(len(index), stop - start, world)
                optimizer.zero_grad(set_to_none=True)
                (batch_loss if scale == 1.0 else batch_loss * scale).backward()
                optimizer.step()
                loss_sum += batch_loss.detach().double() * len(index)
                wrong += (logits.detach().argmax(1) != y).sum()
            scheduler.step()
            # The epoch's one host synchronisation (and, with several processes, one
            # reduction): the loss, the errors and whether any weight went non-finite.
            totals = ctx.all_reduce_sum(
                torch.stack([loss_sum, wrong.double(), _nonfinite_weights(model).double()])
            )
            sgd_loss, sgd_wrong, nonfinite = totals.tolist()
            epoch_time = time.perf_counter() - epoch_start
            epoch_times.append(epoch_time)
            sgd_loss /= seen_per_epoch
            sgd_error = sgd_wrong / seen_per_epoch
            if not math.isfinite(sgd_loss):
                raise diverged(epoch, f"loss {sgd_loss}")
            if nonfinite:
                raise diverged(epoch, "non-finite weights")
            epochs_bar.set_postfix(
                loss=f"{sgd_loss:.4g}", err=f"{sgd_error:.4f}", epoch_s=f"{epoch_time:.1f}"
            )
            if tensorboard is not None:
                log_to_tensorboard(
                    tensorboard, {"loss": sgd_loss, "error": sgd_error, "lr": lr}, epoch, "sgd"
                )
            if epoch not in measure_set and epoch not in (config.epochs, last_epoch):
                continue
            if ctx.enabled:
                # Every rank measures (and rank 0 saves) the same network.
                dist_utils.broadcast_buffers(model)
            # Finite weights can still give non-finite outputs in eval mode (running statistics
            # of exploding activations): one batch tells, before anything is measured or saved.
            if not _eval_outputs_finite(model, train_data, config, memory_format):
                raise diverged(epoch, "non-finite outputs in eval mode")
            rows = []
            if epoch in measure_set:
                try:
                    rows = _measure(
                        model, ctx, config, (train_data, test_data), measure_kwargs, progress
                    )
                except InvalidInputError:  # the labels are valid: non-finite features
                    raise diverged(epoch, "non-finite features in the measurement") from None
                for row in rows:
                    row.update(
                        epoch=epoch,
                        lr=lr,
                        sgd_loss=sgd_loss,
                        sgd_error=sgd_error,
                        world_size=world,
                        wall_time=time.perf_counter() - run_start,
                        epoch_time=epoch_time,
                    )
                rows = [{k: row[k] for k in (*ROW_KEYS, *row) if k in row} for row in rows]
                history.extend(rows)
            _on_main(ctx, partial(save, epoch, rows), f"write the results of epoch {epoch}")
            last_saved = epoch
    finally:
        epochs_bar.close()
        if tensorboard is not None:
            tensorboard.close()
    ctx.barrier()  # rank 0 has written its last checkpoint before any process leaves the group
    return out


def _nonfinite_weights(model) -> torch.Tensor:
    """1 (on the device, no synchronisation) when a parameter or floating buffer of ``model``
    holds a NaN or an infinity, else 0."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().any()


def _eval_outputs_finite(model, data, config: TrainConfig, memory_format) -> bool:
    """Whether ``model``'s eval-mode outputs on the first measurement batch of ``data`` are
    finite (the same on every rank: same weights, same batch)."""
    was_training = model.training
    model.eval()
    try:
        count = min(len(data), config.measure_batch_size)
        x, _ = data.batch(torch.arange(count, device=data.device), memory_format=memory_format)
        with torch.no_grad(), network_autocast(data.device, config.precision):
            return bool(torch.isfinite(model(x)).all())
    finally:
        model.train(was_training)


def _measure(model, ctx, config: TrainConfig, splits, measure_kwargs: dict, progress: bool):
    """The metrics rows (without the epoch's keys) of the training and test splits; DeepFool
    robustness on the test row when asked for (rank 0 only: a modest sample; the other ranks
    wait at the next collective)."""
    rows = []
    bounds = None
    for split, split_data in zip(("train", "test"), splits, strict=True):
        measure_start = time.perf_counter()
        metrics = measure_split(model, split_data, **measure_kwargs)
        row = {"split": split, "measure_time": time.perf_counter() - measure_start}
        row.update(jsonable(metrics))
        if config.measure_overhead:
            if ctx.enabled:
                bounds = dist_utils.shard_bounds(len(split_data), ctx.rank, ctx.world_size)
            row["forward_time"] = _forward_time(
                model, split_data, config, measure_kwargs["channels_last"], bounds
            )
        if split == "test" and config.robustness_samples > 0 and ctx.is_main:
            robust_start = time.perf_counter()
            robust = robustness(
                model,
                split_data,
                samples=config.robustness_samples,
                seed=config.seed,
                device=split_data.device,
                progress=progress,
            )
            row.update({k: robust[k] for k in ROBUSTNESS_KEYS})
            row["robustness_time"] = time.perf_counter() - robust_start
        rows.append(row)
    return rows


def _overhead_line(epoch: int, epoch_time: float, rows: list[dict]) -> str:
    measure = sum(r["measure_time"] for r in rows)
    forward = sum(r["forward_time"] for r in rows)
    beyond = measure - forward
    return (
        f"epoch {epoch:4d} overhead: training {epoch_time:.2f} s | measurement {measure:.2f} s "
        f"= forward passes {forward:.2f} s + statistics {beyond:.2f} s "
        f"({100 * beyond / epoch_time:+.1f}% of the training epoch beyond the forward passes)"
    )
