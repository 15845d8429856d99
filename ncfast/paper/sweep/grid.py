"""A sweep's grid: datasets × networks × losses × learning rates × seeds, and the options of
``ncfast train`` (as :class:`ncfast.paper.config.TrainConfig` fields) given to every run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ncfast.paper.config import MAX_SEED, PRESETS, SEQUENCE_FIELDS, TrainConfig
from ncfast.paper.data import DATASETS
from ncfast.paper.losses import LOSSES, parse_mse_scale
from ncfast.paper.models import FAMILIES, NETS, paper_net
from ncfast.paper.sweep.layout import FORMAT, FORMATS, SWEEP_FILE, SweepError, shown

# HPD22 Appendix A (as PHD20): the five datasets, the three families, both losses and 25
# learning rates log-spaced in [1e-4, 0.25].
PAPER_DATASETS = ("mnist", "fashionmnist", "svhn", "cifar10", "stl10")
PAPER_LRS = "logspace:1e-4,0.25,25"
PAPER_GRID = {
    "datasets": ",".join(PAPER_DATASETS),
    "nets": ",".join(FAMILIES),
    "losses": "mse,ce",
    "lrs": PAPER_LRS,
    "seeds": "0",
}
# Options of `ncfast train` the sweep sets itself (grid coordinates and the run's directory).
GRID_OPTIONS = {
    "dataset": "--datasets",
    "net": "--nets",
    "loss": "--losses",
    "lr": "--lrs",
    "seed": "--seeds",
}
SWEEP_OWNED = {
    "out": "each run's directory is DIR/runs/<run>",
    "resume": "the sweep resumes killed runs itself",
    "overwrite": "the sweep never replaces a run",
    "quiet": "the runs are quiet",
    "stop_after": "use the sweep's --checkpoint-every",
    "tensorboard": "the runs would share one TensorBoard folder",
    "download": "give --download to the sweep (it downloads once, before the runs)",
}
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "preset")
# Significant digits kept of a generated learning rate: the same grid on every platform (libm's
# pow/log10 may differ in the last bit), far finer than any sweep's spacing.
LR_DIGITS = 10
# What can run: a logspace of at most this many learning rates, a grid of at most this many
# runs (HPD22's is 750); larger ones are refused before anything is built.
MAX_LRS = 1000
MAX_RUNS = 100_000


def _items(text, option: str) -> list[str]:
    """'a,b' (or a sequence) -> ['a', 'b']; an empty list or item is an error naming ``option``."""
    items = list(text) if isinstance(text, list | tuple) else str(text).split(",")
    items = [str(v).strip() for v in items]
    if not items or not all(items):
        raise SweepError(f"{option}: expected a comma-separated list, got {shown(text)}")
    return items


def _unique(values: list) -> tuple:
    return tuple(dict.fromkeys(values))


def parse_names(text, option: str, choices: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of names out of ``choices`` (SweepError naming ``option``)."""
    items = _items(text, option)
    bad = [v for v in items if v not in choices]
    if bad:
        raise SweepError(f"{option}: unknown {shown(bad[0])} (choose from {', '.join(choices)})")
    return _unique(items)


def parse_lrs(text) -> tuple[float, ...]:
    """Learning rates: a comma-separated list, or ``logspace:LO,HI,N`` (N ≤ 1000 values
    log-spaced from LO to HI inclusive, kept to 10 significant digits), e.g. HPD22's
    ``logspace:1e-4,0.25,25``."""
    if isinstance(text, str) and text.strip().lower().startswith("logspace:"):
        parts = _items(text.split(":", 1)[1], "--lrs logspace")
        if len(parts) != 3:
            raise SweepError(
                f"--lrs: expected logspace:LO,HI,N (e.g. {PAPER_LRS}), got {shown(text)}"
            )
        lo, hi = (_positive_lr(p, text) for p in parts[:2])
        digits = parts[2]
        if not (digits.isdigit() and len(digits) <= 6 and 1 <= int(digits) <= MAX_LRS):
            raise SweepError(
                f"--lrs: N must be a whole number in 1..{MAX_LRS}, got {shown(parts[2])}"
            )
        n = int(parts[2])
        if n > 1 and not lo < hi:
            raise SweepError(f"--lrs: logspace needs LO < HI, got {shown(text)}")
        if n == 1:
            return (lo,)
        a, b = math.log10(lo), math.log10(hi)
        inner = [
            float(f"{10 ** (a + k * (b - a) / (n - 1)):.{LR_DIGITS}g}") for k in range(1, n - 1)
        ]
        return _unique([lo, *inner, hi])
    return _unique([_positive_lr(v, text) for v in _items(text, "--lrs")])


def _positive_lr(value, text) -> float:
    if isinstance(value, bool):
        raise SweepError(f"--lrs: {shown(value)} is not a number")
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"--lrs: {shown(value)} is not a number (in {shown(text)})") from None
    if not (math.isfinite(lr) and lr > 0):
        raise SweepError(f"--lrs: learning rates must be finite and > 0, got {shown(value)}")
    return lr


def parse_seeds(text) -> tuple[int, ...]:
    """Seeds: a comma-separated list of whole numbers in 0..2**63-1."""
    seeds = []
    for item in _items(text, "--seeds"):
        if not item.isdigit() or int(item) > MAX_SEED:
            raise SweepError(f"--seeds: expected whole numbers in 0..2**63-1, got {shown(item)}")
        seeds.append(int(item))
    return _unique(seeds)


def lr_label(lr: float) -> str:
    """The learning rate in a run's name: 4 significant digits (a grid whose rates share a
    label is refused)."""
    return format(lr, ".4g")


def check_train_options(
    preset: str | None, options: Mapping, where: str = "train option"
) -> tuple[str | None, dict]:
    """The options of ``ncfast train`` given to every run, checked: ``preset`` one of
    :data:`ncfast.paper.config.PRESETS` (or None), ``options`` known
    :class:`~ncfast.paper.config.TrainConfig` fields that are neither the grid's nor the
    sweep's own; returns ``(preset, options without the unset ones)`` (sequences as tuples).
    SweepError naming the option (prefixed with ``where``) otherwise."""
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise SweepError(
            f"{where} --preset: one of {', '.join(sorted(PRESETS))}, got {shown(preset)}"
        )
    values = {str(k): v for k, v in options.items() if v is not None}
    for name, option in GRID_OPTIONS.items():
        if name in values:
            raise SweepError(f"{where} --{name}: the grid sets it; give the values with {option}")
    for name, why in SWEEP_OWNED.items():
        if values.pop(name, False) is not False:
            raise SweepError(f"{where} --{name.replace('_', '-')}: not in a sweep ({why})")
    unknown = sorted(set(values) - set(TRAIN_FIELDS))
    if unknown:
        raise SweepError(f"{where}: unknown option {shown(unknown[0])}")
    device = values.get("device")
    if device is not None and device not in ("cpu", "cuda"):
        raise SweepError(
            f"{where} --device: cpu or cuda in a sweep (each run sees only its own GPUs), "
            f"got {shown(device)}"
        )
    if isinstance(values.get("mse_scale"), str):
        try:
            values["mse_scale"] = parse_mse_scale(values["mse_scale"])
        except ValueError as exc:
            raise SweepError(f"{where} --mse-scale: {exc}") from None
    for key in SEQUENCE_FIELDS:
        if isinstance(values.get(key), list | tuple):
            values[key] = tuple(values[key])
    return preset, values


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid."""

    dataset: str
    net: str  # the network (a family already resolved for the dataset)
    loss: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.net}-{self.loss}-lr{lr_label(self.lr)}-seed{self.seed}"

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.net, self.loss)

    def train_options(self) -> dict:
        """The grid coordinates as :class:`~ncfast.paper.config.TrainConfig` fields."""
        return {
            "dataset": self.dataset,
            "net": self.net,
            "loss": self.loss,
            "lr": self.lr,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Grid:
    """A sweep's grid. ``nets`` as given (families resolve per dataset, see :meth:`runs`);
    ``train_preset`` and ``train_options``: the preset and the other
    :class:`~ncfast.paper.config.TrainConfig` fields of every run (checked by
    :func:`check_train_options`)."""

    datasets: tuple[str, ...]
    nets: tuple[str, ...] = FAMILIES
    losses: tuple[str, ...] = ("mse", "ce")
    lrs: tuple[float, ...] = field(default_factory=lambda: parse_lrs(PAPER_LRS))
    seeds: tuple[int, ...] = (0,)
    train_preset: str | None = None
    train_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("datasets", "nets", "losses", "lrs", "seeds"):
            if not getattr(self, name):
                raise SweepError(f"--{name}: the grid needs at least one value")
        _, options = check_train_options(self.train_preset, self.train_options)
        object.__setattr__(self, "train_options", options)
        size = math.prod(len(getattr(self, n)) for n in ("datasets", "nets", "losses", "lrs"))
        if size * len(self.seeds) > MAX_RUNS:
            raise SweepError(
                f"the grid has {size * len(self.seeds)} runs, more than a sweep can run "
                f"({MAX_RUNS}); give fewer --lrs, --seeds, --datasets, --nets or --losses"
            )

    @classmethod
    def from_options(
        cls,
        datasets,
        nets=",".join(FAMILIES),
        losses="mse,ce",
        lrs=PAPER_LRS,
        seeds="0",
        train_preset: str | None = None,
        train_options: Mapping | None = None,
    ) -> Grid:
        """A grid from the command line's texts (or sequences), checked item by item."""
        return cls(
            datasets=parse_names(datasets, "--datasets", sorted(DATASETS)),
            nets=parse_names(nets, "--nets", [*FAMILIES, *NETS]),
            losses=parse_names(losses, "--losses", LOSSES),
            lrs=parse_lrs(lrs),
            seeds=parse_seeds(seeds),
            train_preset=train_preset,
            train_options=dict(train_options or {}),
        )

    @classmethod
    def paper(cls, train_options: Mapping | None = None) -> Grid:
        """HPD22's grid: 5 datasets × 3 families × {mse, ce} × 25 learning rates, every run
        with ``ncfast train --preset paper`` (SPEC §6)."""
        return cls.from_options(**PAPER_GRID, train_preset="paper", train_options=train_options)

    @classmethod
    def from_command(
        cls,
        preset: str | None,
        grid_options: Mapping[str, str],
        train_preset: str | None = None,
        train_options: Mapping | None = None,
    ) -> Grid | None:
        """The grid of ``ncfast sweep``'s options: ``preset`` "paper" (HPD22's grid, each run
        with the train preset paper unless another is given) with the ``grid_options`` given
        (``datasets``, ``nets``, ``losses``, ``lrs``, ``seeds`` as texts) on top; None when
        nothing is given (the grid stored in the sweep directory)."""
        if not (grid_options or preset or train_preset or train_options):
            return None
        unknown = sorted(set(grid_options) - set(PAPER_GRID))
        if unknown:
            raise SweepError(f"unknown grid option {shown(unknown[0])}")
        if preset == "paper":
            return cls.from_options(
                **{**PAPER_GRID, **grid_options},
                train_preset=train_preset or "paper",
                train_options=train_options,
            )
        if preset is not None:
            raise SweepError(f"--preset: paper or none, got {shown(preset)}")
        if "datasets" not in grid_options:
            raise SweepError("give --datasets (or --preset paper)")
        return cls.from_options(
            **grid_options, train_preset=train_preset, train_options=train_options
        )

    def runs(self) -> list[RunSpec]:
        """Every run, datasets outermost, then networks, losses, learning rates, seeds."""
        specs = []
        for dataset in self.datasets:
            nets = _unique([paper_net(dataset, n) if n in FAMILIES else n for n in self.nets])
            for net in nets:
                for loss in self.losses:
                    for lr in self.lrs:
                        specs += [RunSpec(dataset, net, loss, lr, s) for s in self.seeds]
        return specs

    def shape(self) -> str:
        """'5 datasets × 3 networks × 2 losses × 25 learning rates × 1 seed'."""
        per_dataset = len({(s.dataset, s.net) for s in self.runs()}) // len(self.datasets)
        parts = [
            (len(self.datasets), "dataset", "datasets"),
            (per_dataset, "network", "networks"),
            (len(self.losses), "loss", "losses"),
            (len(self.lrs), "learning rate", "learning rates"),
            (len(self.seeds), "seed", "seeds"),
        ]
        return " × ".join(f"{n} {one if n == 1 else many}" for n, one, many in parts)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "datasets": list(self.datasets),
            "nets": list(self.nets),
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "train_preset": self.train_preset,
            "train_options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.train_options.items()
            },
        }

    @classmethod
    def from_json(cls, values, where: str = SWEEP_FILE, read_train_args=None) -> Grid:
        """The grid of ``sweep.json``'s contents, every field checked (SweepError naming
        ``where`` and the field otherwise). A format-1 file stores the runs' options as
        ``ncfast train`` words: ``read_train_args`` (the command line's parser, words ->
        ``(preset, options)``) reads them; without it that is a SweepError saying so."""
        if not isinstance(values, dict) or values.get("format") not in FORMATS:
            raise SweepError(f"{where}: not a sweep grid of format {FORMAT}")
        try:
            names = {
                "datasets": parse_names(_names(values, "datasets"), "datasets", sorted(DATASETS)),
                "nets": parse_names(_names(values, "nets"), "nets", [*FAMILIES, *NETS]),
                "losses": parse_names(_names(values, "losses"), "losses", LOSSES),
            }
            lrs = _unique([_positive_lr(v, "lrs") for v in _list(values, "lrs")])
            seeds = _unique([_stored_seed(v) for v in _list(values, "seeds")])
            preset, options = _stored_train_options(values, read_train_args)
            grid = cls(**names, lrs=lrs, seeds=seeds, train_preset=preset, train_options=options)
            grid.epochs()  # what --status needs of the options (a run checks them all first)
            return grid
        except SweepError as exc:
            raise SweepError(f"{where}: {str(exc).lstrip('-')}") from None

    def check(self) -> TrainConfig:
        """Check every run's options before anything starts and return the resolved config of
        the first run (the options common to all: epochs, measurement epochs).

        Each distinct (dataset, network, loss) and each distinct (loss, learning rate, seed) is
        resolved through :meth:`ncfast.paper.train.TrainConfig.resolved` (with the device set to the
        CPU when CUDA is asked for but missing here, e.g. on a login node); together they cover
        every option of every run, without building each of 750 networks' shapes again.
        SweepError naming the option otherwise."""
        specs = self.runs()
        names: dict[str, RunSpec] = {}
        for spec in specs:
            other = names.setdefault(spec.name, spec)
            if other != spec:
                raise SweepError(
                    f"--lrs: {other.lr!r} and {spec.lr!r} give the same run name {spec.name}; "
                    "use learning rates that differ in their first 4 significant digits"
                )
        options = dict(self.train_options)
        if options.get("device") == "cuda":
            import torch

            if not torch.cuda.is_available():
                options["device"] = "cpu"
        options.setdefault("device", "cpu")
        first = specs[0]
        seen = set()
        resolved = None
        for spec in specs:
            for key, coords in (
                ("cell", (spec.dataset, spec.net, spec.loss, first.lr, first.seed)),
                ("value", (first.dataset, first.net, spec.loss, spec.lr, spec.seed)),
            ):
                if (key, coords) in seen:
                    continue
                seen.add((key, coords))
                dataset, net, loss, lr, seed = coords
                try:
                    config = TrainConfig.from_preset(
                        self.train_preset,
                        **{**options, "dataset": dataset, "net": net, "loss": loss},
                        lr=lr,
                        seed=seed,
                    ).resolved()
                except (TypeError, ValueError) as exc:
                    raise SweepError(f"run {spec.name}: {exc}") from None
                if key == "cell" and spec == first:
                    resolved = config
        assert resolved is not None  # the first run is resolved first
        if not resolved.measure_epochs or resolved.measure_epochs[-1] != resolved.epochs:
            raise SweepError(
                f"train option --measure-epochs must include the last epoch ({resolved.epochs}): "
                "the sweep selects on the final test error"
            )
        return resolved

    def epochs(self) -> int:
        """The runs' ``epochs`` (without checking the whole grid); SweepError when the stored
        options do not give a whole number ≥ 1."""
        try:
            epochs = TrainConfig.from_preset(self.train_preset, **self.train_options).epochs
        except (TypeError, ValueError) as exc:
            raise SweepError(f"train option: {exc}") from None
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise SweepError(f"train option --epochs: a whole number ≥ 1, got {shown(epochs)}")
        return epochs

    def difference(self, other: Grid) -> list[str]:
        """What differs from the stored grid ``other``: one 'key: X there, Y now' per key."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{k}: {shown(theirs[k])} there, {shown(mine[k])} now"
            for k in mine
            if mine[k] != theirs[k]
        ]


def _list(values: dict, key: str) -> list:
    items = values.get(key)
    if not isinstance(items, list) or not items:
        raise SweepError(f"{key}: expected a non-empty list, got {shown(items)}")
    return items


def _names(values: dict, key: str) -> list[str]:
    items = _list(values, key)
    if not all(isinstance(v, str) for v in items):
        raise SweepError(f"{key}: expected a list of names, got {shown(items)}")
    return items


def _stored_seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise SweepError(f"seeds: expected whole numbers in 0..2**63-1, got {shown(value)}")
    return value


def _stored_train_options(values: dict, read_train_args) -> tuple[str | None, dict]:
    """The runs' options of a stored grid: format 2's ``train_preset`` and ``train_options``,
    or format 1's ``train_args`` words read by ``read_train_args``."""
    if values["format"] == 1:
        words = values.get("train_args", [])
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise SweepError(f"train_args: expected a list of words, got {shown(words)}")
        if read_train_args is None:
            raise SweepError(
                "format 1 stores the runs' options as `ncfast train` words; read it with "
                "`ncfast sweep` (or pass read_train_args)"
            )
        preset, options = read_train_args(words)
        return check_train_options(preset, options, "train_args")
    preset, options = values.get("train_preset"), values.get("train_options", {})
    if not isinstance(options, dict):
        raise SweepError(f"train_options: expected an object, got {shown(options)}")
    return check_train_options(preset, options, "train_options")
