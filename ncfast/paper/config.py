"""The options of a training run (``ncfast train``), in two groups.

- :class:`Experiment`: what defines the run, and so what a resumption must match (the data, the
  network, the loss, the schedule, the seed, the precision). It is stored in the checkpoint.
- :class:`Invocation`: how this process runs it (where the run directory and the data are, the
  device, TensorBoard, where to stop, whether to resume or overwrite, the measurement's memory
  budget and DeepFool sample). These may differ between a run and its resumption.

:class:`TrainConfig` is both, as one flat record (the options of ``ncfast train``, and the
``config`` of ``config.json`` and of the checkpoint, which older releases wrote as the same flat
dict). ``None`` means "the default for this run": :meth:`TrainConfig.resolved` fills it in and
checks every value, one small function per group of options. Defaults are the paper's protocol
(SPEC §6).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from ncfast.backend.precision import check_precision as check_stats_precision
from ncfast.checks import check_device, check_int, check_number
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.paper.evaluate import check_precision
from ncfast.paper.losses import check_loss
from ncfast.paper.models import FAMILIES, NETS, paper_net, parameter_count

# Seeds are 63-bit (they reach torch generators and JSON as int64).
MAX_SEED = 2**63 - 1
# Epochs of a run: far beyond any that can run (the paper's are 350), and a bound to every
# epoch number an option or a checkpoint gives.
MAX_EPOCHS = 1_000_000
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

# Named settings; explicit options override them.
# - "paper": SPEC §6 as is (the defaults; --net may be a family, resolved through Table A.2).
# - "demo": the README's first command, a few minutes on 2 CPU cores. The embedded MNIST subset
#   (4,000 training images), a quarter-width VGG11, every epoch measured. To fit the terminal
#   phase into 70 epochs it trains with 10× the paper's weight decay (collapse speed grows with
#   lr·wd) and decays the learning rate at epochs 50 and 60, after training error has reached 0:
#   NC1 then falls by more than 10× from the zero-error epoch to the end (14× to 27× over seeds
#   0-2 on the machine it was tuned on).
# - "paper" also attacks a modest seeded sample of test images with DeepFool at each
#   measurement (HPD22 Fig. 9).
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
        "online_every": 8,  # and NC of the training passes every 8 of its 32 steps per epoch
        "out": "runs/demo",
    },
}
# The options held as tuples (lists in JSON).
SEQUENCE_FIELDS = ("mse_scale", "lr_milestones", "measure_epochs")


@dataclass
class Experiment:
    """What defines a training run: a resumption must match every field (checked against the
    checkpoint; options added to ncfast later match when they hold their default)."""

    dataset: str = "mnist5k"
    # A name of ncfast.paper.models.NETS, or a family (vgg, resnet, densenet): the depth the
    # paper used for the dataset (HPD22 Table A.2).
    net: str = "resnet"
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
    # Neural Collapse of the training passes themselves every this many SGD steps (rows of
    # split "train_online", no extra forward pass; ncfast.monitor.TrainingWatch); 0: off.
    online_every: int = 0
    seed: int = 0
    precision: str = "fp32"
    # Channels-last activations: faster convolutions on CUDA and on oneDNN CPUs (~30% here).
    channels_last: bool = True
    # With several processes: batch norm over the global batch (as one process would), not
    # over each process's share.
    sync_batchnorm: bool = True
    preset: str | None = None


@dataclass
class Invocation:
    """How one process runs (or resumes) the experiment; free to differ on resumption."""

    out: str | None = None  # run directory; default runs/<dataset>-<net>-<loss>-seed<seed>
    data_root: str | None = None
    download: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    measure_overhead: bool = False
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    # The scatter product's precision policy (docs/precision.md): exact, fast, or auto (per
    # device); config.json also logs what it resolved to on the run's device.
    stats_precision: str = "auto"
    # DeepFool robustness (HPD22 Fig. 9) of this many seeded test images at each measurement
    # epoch, logged on the test row as "robustness"; 0: off.
    robustness_samples: int = 0
    tensorboard: str | None = None  # a folder: every logged scalar also goes to TensorBoard
    # Stop after this epoch with a checkpoint (continue later with resume), e.g. for jobs with
    # a time limit; None: run to the end.
    stop_after: int | None = None
    resume: bool = False
    overwrite: bool = False


EXPERIMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Experiment))
INVOCATION_FIELDS = tuple(f.name for f in dataclasses.fields(Invocation))


@dataclass
class TrainConfig(Invocation, Experiment):
    """Every option of ``ncfast train``: the :class:`Experiment`'s fields, then the
    :class:`Invocation`'s. ``None`` means "the default for this run" (filled in by
    :meth:`resolved`)."""

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
        """A copy with every ``None`` default filled in and every value checked: ValueError
        naming the option for a value out of range, TypeError for one of the wrong kind."""
        c = dataclasses.replace(self)
        for resolve in (
            _resolve_network,
            _resolve_loss,
            _check_sizes,
            _resolve_optimiser,
            _resolve_epochs,
            _check_kinds,
            _resolve_device,
            _resolve_paths,
            _check_model_fits,
        ):
            resolve(c)
        return c

    def merged_for_resume(
        self, options: dict, out, *, tensorboard_off: bool = False
    ) -> TrainConfig:
        """The configuration that resumes the run in ``out`` (this is its stored configuration):
        the ``options`` given now (those not None) on top, ``resume`` on, ``overwrite`` off, and
        no ``stop_after`` unless given now (a stop is for the session that asked for it).
        ``train`` then refuses options that differ in anything but runtime settings.

        TensorBoard: ``tensorboard_off`` turns logging off; a folder given now is used; else the
        stored folder is reused only where it is absolute (where a run logs is for the machine
        it runs on: a relative one is relative to an unknown directory, a ValueError).
        """
        values = self.to_json()
        values["stop_after"] = None
        given = {k: v for k, v in options.items() if v is not None}
        values.update(given, out=out, resume=True, overwrite=False)
        if tensorboard_off:
            values["tensorboard"] = None
        elif "tensorboard" not in given and values["tensorboard"] is not None:
            if not os.path.isabs(values["tensorboard"]):
                raise ValueError(
                    f"--resume: the run's TensorBoard folder {values['tensorboard']!r} is a "
                    "relative path; give --tensorboard DIR (or none) to resume"
                )
        return TrainConfig.from_json(values)

    def experiment_values(self) -> dict:
        """The :class:`Experiment` fields as JSON values (what a resumption must match)."""
        values = self.to_json()
        return {name: values[name] for name in EXPERIMENT_FIELDS}

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in SEQUENCE_FIELDS:
            if out[key] is not None and not isinstance(out[key], str):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        """The config of a flat dict (``config.json``, a checkpoint's ``config``, of this
        release or an older one); keys it does not know (the run's facts) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        for key in SEQUENCE_FIELDS:
            if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

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
            "stats_precision": self.stats_precision,
        }

    @property
    def last_epoch(self) -> int:
        """The epoch this invocation trains to (``stop_after``, else the end)."""
        return self.epochs if self.stop_after is None else self.stop_after


# ------------------------------------------------------------------ resolution, by concern
def _resolve_network(c: TrainConfig) -> None:
    """A family becomes the paper's depth for the dataset; the width is a positive number."""
    if c.net in FAMILIES:
        c.net = paper_net(c.dataset, c.net)
    if c.net not in NETS:
        raise ValueError(
            f"net must be one of {sorted(NETS)} or a family {list(FAMILIES)}, got {c.net!r}"
        )
    check_number(c.width, "width", minimum=0.0, open_minimum=True)


def _resolve_loss(c: TrainConfig) -> None:
    """The loss and its scale (k·M² within float32: the loss is computed in float32)."""
    scale = check_loss(c.loss, c.mse_scale)
    c.mse_scale = None if scale is None else tuple(scale)
    if scale is not None and scale[0] * max(1.0, scale[1]) ** 2 > FLOAT32_MAX:
        raise ValueError(
            f"mse_scale: k·M² must stay within float32's range ({FLOAT32_MAX:.4g}): the "
            f"loss is computed in float32; got k={scale[0]:g}, M={scale[1]:g}"
        )
    check_precision(c.precision)


def _check_sizes(c: TrainConfig) -> None:
    """Counts: epochs, batches, seed, per-class subset, DeepFool sample, memory budget, the
    online measurement's window."""
    check_int(c.epochs, "epochs", 1, maximum=MAX_EPOCHS)
    check_int(c.batch_size, "batch_size", 1)
    check_int(c.measure_batch_size, "measure_batch_size", 1)
    check_int(c.online_every, "online_every", 0)
    check_int(c.seed, "seed", 0, maximum=MAX_SEED)
    check_int(c.robustness_samples, "robustness_samples", 0)
    check_int(c.memory_budget_bytes, "memory_budget_bytes", 0)
    if c.per_class is not None:
        check_int(c.per_class, "per_class", 1)


def _resolve_optimiser(c: TrainConfig) -> None:
    """SGD's numbers, each within float32's range (SGD multiplies float32 weights by them)."""
    if c.lr is None:
        c.lr = REFERENCE_LR[c.loss]
    check_number(c.lr, "lr", minimum=0.0, maximum=FLOAT32_MAX, open_minimum=True)
    check_number(c.weight_decay, "weight_decay", minimum=0.0, maximum=FLOAT32_MAX)
    # Momentum above 1 makes every step grow the velocity: training cannot but diverge.
    check_number(c.momentum, "momentum", minimum=0.0, maximum=1.0)
    check_number(c.lr_gamma, "lr_gamma", minimum=0.0, maximum=FLOAT32_MAX, open_minimum=True)


def _resolve_epochs(c: TrainConfig) -> None:
    """The learning-rate milestones, the measurement epochs and ``stop_after``: epochs of the
    run; the decayed learning rate stays within float32's range."""
    if c.lr_milestones is None:
        c.lr_milestones = tuple(m for m in (c.epochs // 3, 2 * c.epochs // 3) if m >= 1)
    c.lr_milestones = _epoch_list(c.lr_milestones, "lr_milestones", c.epochs)
    if c.lr * max(1.0, c.lr_gamma) ** len(c.lr_milestones) > FLOAT32_MAX:
        raise ValueError(
            f"lr_gamma: the learning rate {c.lr:g} grows past float32's range after "
            f"{len(c.lr_milestones)} decays by {c.lr_gamma:g}"
        )
    if c.measure_epochs is None:
        c.measure_epochs = default_measure_epochs(c.epochs)
    elif c.measure_epochs in ("all", "none"):
        c.measure_epochs = tuple(range(1, c.epochs + 1)) if c.measure_epochs == "all" else ()
    c.measure_epochs = _epoch_list(c.measure_epochs, "measure_epochs", c.epochs)
    if c.stop_after is not None:
        check_int(c.stop_after, "stop_after", 1)
        if c.stop_after > c.epochs:
            raise ValueError(
                f"stop_after must be an epoch in 1..{c.epochs} (--epochs), got {c.stop_after}"
            )


def _check_kinds(c: TrainConfig) -> None:
    """Names and folders are strings; switches are True or False."""
    for name in ("dataset", "out", "data_root", "tensorboard", "device"):
        value = getattr(c, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    for name in (
        "download",
        "channels_last",
        "sync_batchnorm",
        "measure_overhead",
        "resume",
        "overwrite",
    ):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
    check_stats_precision(c.stats_precision, "stats_precision")


def _resolve_device(c: TrainConfig) -> None:
    """cpu or cuda[:N] (default: cuda where available); a CUDA device must exist here."""
    c.device = str(check_device(c.device))


def _resolve_paths(c: TrainConfig) -> None:
    """The default run directory; the TensorBoard folder made absolute, so that a resumption
    from another working directory logs to the same place (the checkpoint stores it)."""
    if c.out is None:
        c.out = f"runs/{c.dataset}-{c.net}-{c.loss}-seed{c.seed}"
    if c.tensorboard is not None:
        c.tensorboard = os.path.abspath(os.path.expanduser(c.tensorboard))


def _check_model_fits(c: TrainConfig) -> None:
    """The network can be built at this width and fits the device (registry datasets only:
    others are checked once their data is loaded)."""
    shape = dataset_shape(c.dataset)
    if shape is not None:
        check_model_size(c.net, *shape, c.width, c.device)


def _epoch_list(values, name: str, epochs: int) -> tuple[int, ...]:
    values = tuple(values)
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= epochs:
            raise ValueError(f"{name} must be epochs in 1..{epochs} (--epochs), got {v!r}")
    return tuple(sorted(set(values)))


def default_measure_epochs(epochs: int) -> tuple[int, ...]:
    """SPEC §6's measurement epochs scaled from 350 to ``epochs`` (rounded, deduplicated; the
    last epoch is always measured)."""
    check_int(epochs, "epochs", 1)
    scaled = {
        min(epochs, max(1, math.floor(e * epochs / PAPER_EPOCHS + 0.5)))
        for e in PAPER_MEASURE_EPOCHS
    }
    return tuple(sorted(scaled | {epochs}))


# ------------------------------------------------------------------------ the model's size
def dataset_shape(dataset) -> tuple[int, int, int] | None:
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
    """The parameter count of ``net`` at ``width``, counted without allocating it
    (:func:`ncfast.paper.models.parameter_count`); ValueError naming ``width`` when such a
    network cannot be built or its weights, gradients and momentum (float32) would not fit in
    the memory of ``device``."""
    try:
        count = parameter_count(net, num_classes, in_channels, image_size, width)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"width: a {net} of width {width:g} cannot be built ({detail[:120]}); choose a "
            "smaller --width"
        ) from None
    needed = 3 * 4 * count  # float32 weights, gradients and momentum
    available = _device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"width: a {net} of width {width:g} has {count:,} parameters, {needed / 2**30:.1f} "
            f"GiB with their gradients and momentum: more than the {available / 2**30:.1f} GiB "
            f"of memory of {device}; choose a smaller --width"
        )
    return count


__all__ = [
    "EXPERIMENT_FIELDS",
    "INVOCATION_FIELDS",
    "MAX_EPOCHS",
    "MAX_SEED",
    "PAPER_EPOCHS",
    "PAPER_MEASURE_EPOCHS",
    "PRESETS",
    "REFERENCE_LR",
    "Experiment",
    "Invocation",
    "TrainConfig",
    "check_model_size",
    "dataset_shape",
    "default_measure_epochs",
]
