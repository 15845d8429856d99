"""Training with Neural Collapse measured in the loop (the paper's protocol, SPEC §6).

``train(TrainConfig(...))`` trains one network on one dataset and, at the measurement epochs,
measures the training and test splits with :func:`ncfast.evaluate.measure_split` (eval mode,
streamed, nothing per-sample kept). It writes, in the run directory ``out``:

- ``config.json``: the resolved configuration (every default filled in),
- ``metrics.jsonl``: one flat JSON object per measured epoch and split: ``epoch``, ``split``
  (``train``/``test``), ``lr`` (of that epoch), ``sgd_loss``/``sgd_error`` (running means over
  the epoch's SGD steps, train mode), ``wall_time`` (seconds since the run began, across
  resumptions), ``epoch_time`` (the epoch's training), ``measure_time`` (this split's
  measurement), ``forward_time`` (with ``measure_overhead``), and every key of
  :func:`ncfast.evaluate.measure_split` (``error``, ``loss``, all SPEC §2–§4 keys with λ as
  ``weight_decay``; ``snr_singular_values`` a list),
- ``checkpoint.pt``: model, optimiser, scheduler, RNG states, config and metrics history
  (see :mod:`ncfast.checkpoint`), rewritten atomically after each measurement and at the end.

An epoch is a permutation of the training indices drawn from a generator seeded with
``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one; on the CPU it
reproduces the same metrics exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ncfast import __version__
from ncfast.checkpoint import FORMAT, load_checkpoint, save_checkpoint, write_text_atomic
from ncfast.evaluate import check_precision, measure_split, network_autocast, split_features
from ncfast.losses import check_loss, compute_loss
from ncfast.metrics import mse_lambda
from ncfast.models import FAMILIES, NETS, build, paper_net
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"

# SPEC §6: the paper's 50 measurement epochs of a 350-epoch run.
PAPER_EPOCHS = 350
PAPER_MEASURE_EPOCHS = (
    *range(1, 15),
    *(16, 17, 19, 20, 22, 24, 27, 29, 32, 35, 38, 42, 45, 50, 54, 59, 65, 71, 77, 85, 92),
    *(101, 110, 121, 132, 144, 158, 172, 188, 206, 225, 245, 268, 293, 320, 350),
)

# SPEC §6: reference learning rates (MNIST-ResNet18) used when --lr is not given.
REFERENCE_LR = {"mse": 0.0184, "mse-rescaled": 0.0184, "ce": 0.0679}

# Keys of a metrics row besides those of measure_split.
TIME_KEYS = ("wall_time", "epoch_time", "measure_time")
ROW_KEYS = ("epoch", "split", "lr", "sgd_loss", "sgd_error", *TIME_KEYS)

# Named settings; explicit options override them.
# - "paper": SPEC §6 as is (the defaults; --net may be a family, resolved through Table A.2).
# - "demo": the README's first command, a few minutes on 2 CPU cores. The embedded MNIST subset
#   (4,000 training images), a quarter-width VGG11, every epoch measured. To fit the terminal
#   phase into 70 epochs it trains with 10× the paper's weight decay (collapse speed grows with
#   lr·wd) and decays the learning rate at epochs 50 and 60, after training error has reached 0:
#   NC1 then falls by more than 10× from the zero-error epoch to the end (14× to 27× over seeds
#   0-2 on the machine it was tuned on).
PRESETS: dict[str, dict] = {
    "paper": {},
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
    # A name of ncfast.models.NETS, or a family (vgg, resnet, densenet): the depth the paper used
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
        check_precision(c.precision)
        _check_int(c.epochs, "epochs", 1)
        _check_int(c.batch_size, "batch_size", 1)
        _check_int(c.measure_batch_size, "measure_batch_size", 1)
        _check_int(c.seed, "seed", 0)
        if c.per_class is not None:
            _check_int(c.per_class, "per_class", 1)
        _check_positive(c.width, "width")
        if c.lr is None:
            c.lr = REFERENCE_LR[c.loss]
        _check_positive(c.lr, "lr")
        for name in ("weight_decay", "momentum"):
            value = getattr(c, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        _check_positive(c.lr_gamma, "lr_gamma")
        if c.lr_milestones is None:
            c.lr_milestones = tuple(m for m in (c.epochs // 3, 2 * c.epochs // 3) if m >= 1)
        c.lr_milestones = _epoch_list(c.lr_milestones, "lr_milestones", c.epochs)
        if c.measure_epochs is None:
            c.measure_epochs = default_measure_epochs(c.epochs)
        elif c.measure_epochs in ("all", "none"):
            c.measure_epochs = tuple(range(1, c.epochs + 1)) if c.measure_epochs == "all" else ()
        c.measure_epochs = _epoch_list(c.measure_epochs, "measure_epochs", c.epochs)
        if c.device is None:
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.device not in ("cpu", "cuda") and not c.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {c.device!r}")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {c.device!r} was asked for but CUDA is not available here")
        if c.out is None:
            c.out = f"runs/{c.dataset}-{c.net}-{c.loss}-seed{c.seed}"
        return c

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("mse_scale", "lr_milestones", "measure_epochs"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        for key in ("mse_scale", "lr_milestones", "measure_epochs"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (holds another run, or the resumed run had
    other options)."""


def _check_int(value, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def _check_positive(value, name: str) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


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
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator, device=device)


def epoch_batches(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """Slices of the permutation; a last batch of a single sample is left out (batch norm
    cannot train on it; that sample is in another position in the next epoch)."""
    bounds = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """(train, test) :class:`ncfast.data.LabeledImages` on the run's device."""
    from ncfast.data import load_dataset

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
    """The configuration stored in the checkpoint of the run in ``out``."""
    payload = load_checkpoint(Path(out) / CHECKPOINT_FILE)
    return TrainConfig.from_json(payload["config"])


def _check_same_run(config: TrainConfig, stored: dict, path: Path) -> None:
    mine = config.to_json()
    differ = [
        f"{k}: checkpoint {stored.get(k)!r}, now {mine[k]!r}"
        for k in mine
        if k not in TrainConfig.RUNTIME_FIELDS and stored.get(k) != mine[k]
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


def _forward_time(model, data, config: TrainConfig, channels_last: bool) -> float:
    """Seconds for a plain eval-mode forward pass over ``data`` (the measurement's floor)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = torch.zeros((), device=data.device)
    for h, _ in split_features(
        model, data, config.measure_batch_size, config.precision, channels_last
    ):
        with torch.no_grad():
            total += model.classifier(h).sum()
    float(total)  # waits for the device
    model.train(was_training)
    return time.perf_counter() - start


def train(config: TrainConfig, progress: bool = True, data=None) -> Path:
    """Run (or with ``config.resume``, continue) the training of ``config``; returns the run
    directory. ``data``: an optional ``(train, test)`` pair of
    :class:`ncfast.data.LabeledImages` to use instead of loading ``config.dataset``."""
    config = config.resolved()
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_FILE
    metrics_path = out / METRICS_FILE
    payload = None
    if config.resume:
        payload = load_checkpoint(checkpoint_path)
        _check_same_run(config, payload["config"], checkpoint_path)
    elif not config.overwrite and (checkpoint_path.exists() or metrics_path.exists()):
        raise RunDirectoryError(
            f"out: {out} already holds a run; continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )

    device = torch.device(config.device)
    if data is None:
        train_data, test_data = load_data(config)
    else:
        train_data, test_data = (d.to(device) for d in data)
    if train_data.num_classes != test_data.num_classes:
        raise ValueError("the training and test splits have different numbers of classes")
    num_classes = train_data.num_classes
    _, in_channels, height, width = train_data.images.shape
    if height != width:
        raise ValueError(f"images must be square, got {height}×{width}")

    model = build_model(config, num_classes, in_channels, height).to(device)
    channels_last = config.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer, scheduler = make_optimizer(model, config, device)
    history: list[dict] = []
    epoch_times: list[float] = []  # training seconds of every epoch (benchmarks read them)
    start_epoch = 0
    elapsed_before = 0.0
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        _match_state_layout(optimizer)
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        history = list(payload["history"])
        start_epoch = int(payload["epoch"])
        elapsed_before = float(payload.get("wall_time", 0.0))
        epoch_times = list(payload.get("epoch_times", []))

    out.mkdir(parents=True, exist_ok=True)
    config_record = {
        **config.to_json(),
        "ncfast_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": height,
        "train_samples": len(train_data),
        "test_samples": len(test_data),
        "feature_dim": model.feature_dim,
        "lambda": mse_lambda(config.weight_decay, num_classes),
    }
    write_text_atomic(out / CONFIG_FILE, json.dumps(config_record, indent=2) + "\n")
    # The log always matches the checkpoint: lines a killed run wrote after it are dropped.
    write_text_atomic(metrics_path, _metrics_lines(history))

    measure_kwargs = {
        "loss": config.loss,
        "sgd_weight_decay": config.weight_decay,
        "batch_size": config.measure_batch_size,
        "precision": config.precision,
        "mse_scale": config.mse_scale,
        "memory_budget_bytes": config.memory_budget_bytes,
        "channels_last": channels_last,
    }
    measure_set = set(config.measure_epochs)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    num_train = len(train_data)
    batches = epoch_batches(num_train, config.batch_size)
    seen_per_epoch = batches[-1][1]
    run_start = time.perf_counter() - elapsed_before

    def checkpoint(epoch: int) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "format": FORMAT,
                "ncfast_version": __version__,
                "epoch": epoch,
                "config": config.to_json(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "history": history,
                "wall_time": time.perf_counter() - run_start,
                "epoch_times": epoch_times,
            },
        )

    epochs_bar = tqdm(
        range(start_epoch + 1, config.epochs + 1),
        total=config.epochs,
        initial=start_epoch,
        desc=f"{config.dataset}/{config.net}/{config.loss}",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    )
    for epoch in epochs_bar:
        model.train()
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        perm = epoch_permutation(num_train, config.seed, epoch, device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        for start, stop in tqdm(
            batches, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch"
        ):
            x, y = train_data.batch(perm[start:stop], memory_format=memory_format)
            with network_autocast(device, config.precision):
                logits = model(x)
            batch_loss = compute_loss(config.loss, logits, y, config.mse_scale)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss_sum += batch_loss.detach().double() * (stop - start)
            wrong += (logits.detach().argmax(1) != y).sum()
        scheduler.step()
        # The epoch's one host synchronisation.
        sgd_loss, sgd_wrong = torch.stack([loss_sum, wrong.double()]).tolist()
        epoch_time = time.perf_counter() - epoch_start
        epoch_times.append(epoch_time)
        sgd_loss /= seen_per_epoch
        sgd_error = sgd_wrong / seen_per_epoch
        if not math.isfinite(sgd_loss):
            raise FloatingPointError(
                f"epoch {epoch}: the training loss is {sgd_loss}; lower --lr (now {config.lr})"
            )
        epochs_bar.set_postfix(
            loss=f"{sgd_loss:.4g}", err=f"{sgd_error:.4f}", epoch_s=f"{epoch_time:.1f}"
        )
        if epoch not in measure_set and epoch != config.epochs:
            continue
        rows = []
        if epoch in measure_set:
            for split, split_data in (("train", train_data), ("test", test_data)):
                measure_start = time.perf_counter()
                metrics = measure_split(model, split_data, **measure_kwargs)
                measure_time = time.perf_counter() - measure_start
                row = {
                    "epoch": epoch,
                    "split": split,
                    "lr": lr,
                    "sgd_loss": sgd_loss,
                    "sgd_error": sgd_error,
                    "wall_time": time.perf_counter() - run_start,
                    "epoch_time": epoch_time,
                    "measure_time": measure_time,
                    **jsonable(metrics),
                }
                if config.measure_overhead:
                    row["forward_time"] = _forward_time(model, split_data, config, channels_last)
                rows.append(row)
            history.extend(rows)
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(_metrics_lines(rows))
            if progress or config.measure_overhead:
                tqdm.write(_summary(epoch, rows))
            if config.measure_overhead:
                tqdm.write(_overhead_line(epoch, epoch_time, rows))
        checkpoint(epoch)
    epochs_bar.close()
    return out


def _overhead_line(epoch: int, epoch_time: float, rows: list[dict]) -> str:
    measure = sum(r["measure_time"] for r in rows)
    forward = sum(r["forward_time"] for r in rows)
    beyond = measure - forward
    return (
        f"epoch {epoch:4d} overhead: training {epoch_time:.2f} s | measurement {measure:.2f} s "
        f"= forward passes {forward:.2f} s + statistics {beyond:.2f} s "
        f"({100 * beyond / epoch_time:+.1f}% of the training epoch beyond the forward passes)"
    )
