"""Mutation guards of a sweep's grid (ncfast/paper/sweep/grid.py): the parsing of each grid
option, the checks of the runs' options, the runs' names and order, ``sweep.json`` written and
read back, and the checks made before anything starts, each pinned exactly and in-process (no
run is trained), so that a small change of the module fails here in seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ncfast.cli.sweep import read_train_args
from ncfast.paper.config import MAX_SEED, TrainConfig
from ncfast.paper.models import FAMILIES
from ncfast.paper.sweep import grid as grid_module
from ncfast.paper.sweep.grid import (
    GRID_OPTIONS,
    PAPER_GRID,
    SWEEP_OWNED,
    TRAIN_FIELDS,
    Grid,
    RunSpec,
    check_train_options,
    lr_label,
    parse_lrs,
    parse_names,
    parse_seeds,
)
from ncfast.paper.sweep.layout import SweepError

PAPER_LRS = "logspace:1e-4,0.25,25"


def small(**changes) -> Grid:
    values = {"datasets": "mnist5k", "nets": "vgg", "losses": "mse", "lrs": "0.01"}
    return Grid.from_options(**{**values, **changes})


# ----------------------------------------------------------------------- the constants
def test_the_paper_grid_and_the_limits():
    assert grid_module.PAPER_DATASETS == ("mnist", "fashionmnist", "svhn", "cifar10", "stl10")
    assert grid_module.PAPER_LRS == PAPER_LRS
    assert PAPER_GRID == {
        "datasets": "mnist,fashionmnist,svhn,cifar10,stl10",
        "nets": "vgg,resnet,densenet",
        "losses": "mse,ce",
        "lrs": PAPER_LRS,
        "seeds": "0",
    }
    assert GRID_OPTIONS == {
        "dataset": "--datasets",
        "net": "--nets",
        "loss": "--losses",
        "lr": "--lrs",
        "seed": "--seeds",
    }
    assert SWEEP_OWNED == {
        "out": "each run's directory is DIR/runs/<run>",
        "resume": "the sweep resumes killed runs itself",
        "overwrite": "the sweep never replaces a run",
        "quiet": "the runs are quiet",
        "stop_after": "use the sweep's --checkpoint-every",
        "tensorboard": "the runs would share one TensorBoard folder",
        "download": "give --download to the sweep (it downloads once, before the runs)",
    }
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert TRAIN_FIELDS == tuple(f for f in fields if f != "preset") and "preset" in fields
    assert (grid_module.LR_DIGITS, grid_module.MAX_LRS, grid_module.MAX_RUNS) == (10, 1000, 100_000)


# --------------------------------------------------------------------- names and seeds
def test_parse_names_keeps_the_first_of_each_name_in_order():
    choices = ["a", "b", "c"]
    assert parse_names(" b, a,b ", "--x", choices) == ("b", "a")
    assert parse_names(["c", "a"], "--x", choices) == ("c", "a")
    assert parse_names(("a",), "--x", choices) == ("a",)
    with pytest.raises(SweepError) as caught:
        parse_names("a,z,y", "--x", choices)
    assert str(caught.value) == "--x: unknown 'z' (choose from a, b, c)"


@pytest.mark.parametrize("text", ["", " ", "a,", ",a", "a, ,b", [], ["a", ""], ()])
def test_an_empty_list_or_item_is_refused(text):
    with pytest.raises(SweepError) as caught:
        parse_names(text, "--x", ["a", "b"])
    assert str(caught.value).startswith("--x: expected a comma-separated list, got ")


def test_parse_seeds():
    assert parse_seeds("3, 0,3") == (3, 0)
    assert parse_seeds(f"0,{MAX_SEED}") == (0, MAX_SEED)
    assert parse_seeds([1, "2"]) == (1, 2)
    for text in (str(MAX_SEED + 1), "-1", "1.0", "x", "+1", "1,"):
        with pytest.raises(SweepError, match="^--seeds: "):
            parse_seeds(text)


# ---------------------------------------------------------------------- learning rates
def test_a_logspace_keeps_ten_significant_digits_between_its_exact_ends():
    assert parse_lrs("logspace:1,2,3") == (1.0, 1.414213562, 2.0)
    assert parse_lrs(" LogSpace:1, 100 ,3") == (1.0, 10.0, 100.0)
    assert parse_lrs("logspace:1,1000,4") == (1.0, 10.0, 100.0, 1000.0)
    assert parse_lrs("logspace:0.5,2,2") == (0.5, 2.0)
    lrs = parse_lrs(PAPER_LRS)
    assert len(lrs) == 25 and (lrs[0], lrs[-1]) == (1e-4, 0.25)
    assert lrs[1:4] == (0.0001385418025, 0.0001919383104, 0.0002659147948)
    assert len(parse_lrs("logspace:1e-4,0.25,1000")) == 1000


def test_a_logspace_of_one_value_is_its_start_whatever_its_end():
    assert parse_lrs("logspace:0.5,0.1,1") == (0.5,)
    assert parse_lrs("logspace:0.5,0.5,0001") == (0.5,)


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("logspace:1,2", "--lrs: expected logspace:LO,HI,N"),
        ("logspace:1,2,3,4", "--lrs: expected logspace:LO,HI,N"),
        ("logspace:1,1,2", "--lrs: logspace needs LO < HI"),
        ("logspace:2,1,3", "--lrs: logspace needs LO < HI"),
        ("logspace:1,2,0", "--lrs: N must be a whole number in 1..1000, got '0'"),
        ("logspace:1,2,1001", "--lrs: N must be a whole number in 1..1000, got '1001'"),
        ("logspace:1,2,0000001", "--lrs: N must be a whole number in 1..1000"),
        ("logspace:1,2,+3", "--lrs: N must be a whole number"),
        ("logspace:0,2,3", "--lrs: learning rates must be finite and > 0, got '0'"),
        ("logspace:1,,3", "--lrs logspace: expected a comma-separated list"),
        ("0.1,-0.1", "--lrs: learning rates must be finite and > 0, got '-0.1'"),
        ("0.1,nan", "--lrs: learning rates must be finite and > 0"),
        ("0.1,inf", "--lrs: learning rates must be finite and > 0"),
        ("0.1,x", "--lrs: 'x' is not a number (in '0.1,x')"),
        ("0.1,", "--lrs: expected a comma-separated list"),
    ],
)
def test_bad_learning_rates(text, start):
    with pytest.raises(SweepError) as caught:
        parse_lrs(text)
    assert str(caught.value).startswith(start), str(caught.value)


def test_a_list_of_learning_rates_is_kept_in_order_once_each():
    assert parse_lrs(" 0.3,0.1 ,0.3,1e-2") == (0.3, 0.1, 0.01)
    assert parse_lrs([0.5, "0.25"]) == (0.5, 0.25)


def test_the_learning_rate_label_has_four_significant_digits():
    assert [lr_label(v) for v in (0.012345, 1e-4, 0.25, 123456.0, 1.0)] == [
        "0.01235",
        "0.0001",
        "0.25",
        "1.235e+05",
        "1",
    ]


# ------------------------------------------------------------------- the runs' options
def test_check_train_options_keeps_the_set_options():
    options = {"epochs": 2, "width": None, "lr_milestones": [1, 2], "mse_scale": "1,15"}
    assert check_train_options(None, options) == (
        None,
        {"epochs": 2, "lr_milestones": (1, 2), "mse_scale": (1.0, 15.0)},
    )
    assert check_train_options("paper", {"measure_epochs": (1,)}) == (
        "paper",
        {"measure_epochs": (1,)},
    )
    assert check_train_options("demo", {"device": "cuda"}) == ("demo", {"device": "cuda"})
    assert check_train_options(None, {"device": "cpu"}) == (None, {"device": "cpu"})
    # The sweep's own options given as False (a parser's default) are no options.
    assert check_train_options(None, {"resume": False, "quiet": False}) == (None, {})


@pytest.mark.parametrize("name", sorted(GRID_OPTIONS))
def test_the_grids_options_are_refused_as_train_options(name):
    with pytest.raises(SweepError) as caught:
        check_train_options(None, {name: 1}, "where")
    assert str(caught.value) == (
        f"where --{name}: the grid sets it; give the values with {GRID_OPTIONS[name]}"
    )


@pytest.mark.parametrize("name", sorted(SWEEP_OWNED))
def test_the_sweeps_own_options_are_refused_as_train_options(name):
    with pytest.raises(SweepError) as caught:
        check_train_options(None, {name: True})
    flag = name.replace("_", "-")
    assert str(caught.value) == f"train option --{flag}: not in a sweep ({SWEEP_OWNED[name]})"


@pytest.mark.parametrize(
    ("preset", "options", "message"),
    [
        ("nope", {}, "train option --preset: one of demo, paper, got 'nope'"),
        (5, {}, "train option --preset: one of demo, paper, got 5"),
        (None, {"zz": 1, "aa": 2}, "train option: unknown option 'aa'"),
        (None, {"device": "cuda:1"}, "train option --device: cpu or cuda in a sweep"),
        (None, {"mse_scale": "1"}, "train option --mse-scale: mse_scale must be two numbers"),
    ],
)
def test_bad_train_options(preset, options, message):
    with pytest.raises(SweepError) as caught:
        check_train_options(preset, options)
    assert str(caught.value).startswith(message), str(caught.value)


# ---------------------------------------------------------------------------- the runs
def test_a_run_spec_names_its_run():
    spec = RunSpec("cifar10", "resnet50", "ce", 0.012345, 7)
    assert spec.name == "cifar10-resnet50-ce-lr0.01235-seed7"
    assert spec.cell == ("cifar10", "resnet50", "ce")
    assert spec.train_options() == {
        "dataset": "cifar10",
        "net": "resnet50",
        "loss": "ce",
        "lr": 0.012345,
        "seed": 7,
    }


def test_runs_are_datasets_then_networks_losses_rates_seeds():
    grid = small(datasets="mnist,svhn", nets="vgg,resnet18", losses="mse,ce", lrs="0.1,0.2")
    grid = dataclasses.replace(grid, seeds=(1, 0))
    names = [s.name for s in grid.runs()]
    expected = [
        f"{d}-{n}-{loss}-lr{lr}-seed{s}"
        for d, nets in (("mnist", ("vgg11", "resnet18")), ("svhn", ("vgg13", "resnet18")))
        for n in nets
        for loss in ("mse", "ce")
        for lr in ("0.1", "0.2")
        for s in (1, 0)
    ]
    assert names == expected
    # A family and its own depth are one network.
    assert [s.net for s in small(nets="vgg11,vgg").runs()] == ["vgg11"]


def test_the_shape_counts_networks_per_dataset_in_singular_and_plural():
    assert small().shape() == "1 dataset × 1 network × 1 loss × 1 learning rate × 1 seed"
    grid = small(datasets="mnist,svhn", nets="vgg,resnet", losses="mse,ce", lrs="0.1,0.2")
    grid = dataclasses.replace(grid, seeds=(0, 1))
    assert grid.shape() == "2 datasets × 2 networks × 2 losses × 2 learning rates × 2 seeds"


def test_a_grid_defaults_to_the_papers_values():
    grid = Grid(("mnist",))
    assert grid.nets == FAMILIES and grid.losses == ("mse", "ce")
    assert grid.lrs == parse_lrs(PAPER_LRS) and grid.seeds == (0,)
    assert grid.train_preset is None and grid.train_options == {}
    assert Grid.from_options("mnist") == grid
    assert Grid(("mnist",), train_options={"lr_milestones": [3]}).train_options == {
        "lr_milestones": (3,)
    }


@pytest.mark.parametrize("name", ["datasets", "nets", "losses", "lrs", "seeds"])
def test_every_axis_needs_a_value(name):
    with pytest.raises(SweepError, match=f"^--{name}: the grid needs at least one value$"):
        dataclasses.replace(Grid(("mnist",)), **{name: ()})


def test_a_grid_of_at_most_max_runs_is_accepted():
    lrs = parse_lrs("logspace:0.01,0.1,1000")
    base = {"datasets": ("mnist",), "nets": ("vgg11",), "losses": ("mse",), "lrs": lrs}
    assert len(Grid(**base, seeds=tuple(range(100))).lrs) == 1000
    with pytest.raises(SweepError, match="^the grid has 101000 runs, more than a sweep can run"):
        Grid(**base, seeds=tuple(range(101)))


def test_the_paper_grid_and_the_commands_grid():
    paper = Grid.paper({"epochs": 3})
    assert (paper.datasets, paper.nets, paper.losses) == (
        ("mnist", "fashionmnist", "svhn", "cifar10", "stl10"),
        FAMILIES,
        ("mse", "ce"),
    )
    assert paper.lrs == parse_lrs(PAPER_LRS) and paper.seeds == (0,)
    assert (paper.train_preset, paper.train_options) == ("paper", {"epochs": 3})
    assert Grid.from_command(None, {}) is None
    assert Grid.from_command("paper", {}) == Grid.paper()
    ours = Grid.from_command("paper", {"lrs": "0.1", "seeds": "1"}, "demo", {"epochs": 2})
    assert ours == dataclasses.replace(
        Grid.paper({"epochs": 2}), lrs=(0.1,), seeds=(1,), train_preset="demo"
    )
    given = Grid.from_command(None, {"datasets": "mnist", "lrs": "0.1"}, "demo", {"epochs": 2})
    assert given == Grid.from_options("mnist", lrs="0.1", train_preset="demo").__class__(
        ("mnist",), FAMILIES, ("mse", "ce"), (0.1,), (0,), "demo", {"epochs": 2}
    )


@pytest.mark.parametrize(
    ("preset", "grid_options", "train_preset", "train_options", "message"),
    [
        (None, {"lr": "0.1"}, None, None, "unknown grid option 'lr'"),
        ("other", {}, None, None, "--preset: paper or none, got 'other'"),
        (None, {"lrs": "0.1"}, None, None, "give --datasets (or --preset paper)"),
        (None, {}, "demo", None, "give --datasets (or --preset paper)"),
        (None, {}, None, {"epochs": 2}, "give --datasets (or --preset paper)"),
    ],
)
def test_the_commands_grid_errors(preset, grid_options, train_preset, train_options, message):
    with pytest.raises(SweepError) as caught:
        Grid.from_command(preset, grid_options, train_preset, train_options)
    assert str(caught.value) == message


# ------------------------------------------------------------------------- sweep.json
def test_sweep_json_is_the_grid_in_lists():
    grid = Grid.from_options(
        "mnist5k,svhn",
        "vgg",
        "ce",
        "0.1,0.2",
        "0,4",
        "demo",
        {"epochs": 2, "lr_milestones": [1]},
    )
    values = grid.to_json()
    assert values == {
        "format": 2,
        "datasets": ["mnist5k", "svhn"],
        "nets": ["vgg"],
        "losses": ["ce"],
        "lrs": [0.1, 0.2],
        "seeds": [0, 4],
        "train_preset": "demo",
        "train_options": {"epochs": 2, "lr_milestones": [1]},
    }
    assert Grid.from_json(values) == grid
    assert Grid.from_json({**values, "train_options": {}, "train_preset": None}) == (
        dataclasses.replace(grid, train_options={}, train_preset=None)
    )
    bare = {k: v for k, v in values.items() if k not in ("train_options", "train_preset")}
    assert Grid.from_json(bare) == dataclasses.replace(grid, train_options={}, train_preset=None)
    assert Grid.from_json({**values, "seeds": [MAX_SEED]}).seeds == (MAX_SEED,)


def test_a_sweep_json_of_format_1_reads_its_words():
    values = {**small().to_json(), "format": 1, "train_args": ["--epochs", "2"]}
    del values["train_options"], values["train_preset"]
    assert Grid.from_json(values, read_train_args=read_train_args) == small(
        train_options={"epochs": 2}
    )
    del values["train_args"]
    assert Grid.from_json(values, read_train_args=read_train_args) == small()
    with pytest.raises(SweepError) as caught:
        Grid.from_json(values, "F")
    assert str(caught.value).startswith("F: format 1 stores the runs' options as `ncfast train`")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 3}, "F: not a sweep grid of format 2"),
        ({"format": None}, "F: not a sweep grid of format 2"),
        ({"datasets": []}, "F: datasets: expected a non-empty list, got []"),
        ({"nets": "vgg"}, "F: nets: expected a non-empty list, got 'vgg'"),
        ({"losses": ["mse", 1]}, "F: losses: expected a list of names, got ['mse', 1]"),
        ({"losses": ["hinge"]}, "F: losses: unknown 'hinge' (choose from mse, ce, mse-rescaled)"),
        ({"lrs": [0.1, True]}, "F: lrs: True is not a number"),
        ({"seeds": [True]}, "F: seeds: expected whole numbers in 0..2**63-1, got True"),
        ({"seeds": [-1]}, "F: seeds: expected whole numbers in 0..2**63-1, got -1"),
        ({"seeds": [MAX_SEED + 1]}, "F: seeds: expected whole numbers"),
        ({"seeds": [0.0]}, "F: seeds: expected whole numbers"),
        ({"train_options": []}, "F: train_options: expected an object, got []"),
        ({"train_options": {"lr": 1}}, "F: train_options --lr: the grid sets it"),
        ({"train_options": {"epochs": 0}}, "F: train option --epochs: a whole number ≥ 1, got 0"),
        ({"format": 1, "train_args": "--epochs 2"}, "F: train_args: expected a list of words"),
        ({"format": 1, "train_args": [2]}, "F: train_args: expected a list of words, got [2]"),
    ],
)
def test_a_bad_sweep_json_names_its_field(changes, message):
    values = {**small().to_json(), **changes}
    with pytest.raises(SweepError) as caught:
        Grid.from_json(values, "F", read_train_args)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_sweep_json_that_is_not_an_object_is_refused():
    with pytest.raises(SweepError, match="^sweep.json: not a sweep grid of format 2$"):
        Grid.from_json([1])


# ---------------------------------------------------------------- checks before running
def test_check_resolves_the_first_run_on_the_cpu():
    grid = small(lrs="0.2,0.1", train_options={"epochs": 3, "device": "cuda"})
    config = grid.check()
    assert (config.epochs, config.lr, config.seed, config.dataset) == (3, 0.2, 0, "mnist5k")
    assert config.measure_epochs[-1] == 3
    if not torch.cuda.is_available():
        assert config.device == "cpu"
    assert small().check().device == "cpu"


def test_check_names_the_run_whose_options_fail():
    grid = small(lrs="0.01,0.05", train_options={"lr_gamma": 1e20})
    with pytest.raises(SweepError) as caught:
        grid.check()
    assert str(caught.value).startswith("run mnist5k-vgg11-mse-lr0.05-seed0: lr_gamma")


def test_check_refuses_rates_of_one_name_and_measurements_without_the_last_epoch():
    with pytest.raises(SweepError, match="^--lrs: 0.1 and 0.10001 give the same run name"):
        small(lrs="0.1,0.10001").check()
    small(train_options={"epochs": 2, "measure_epochs": (1, 2)}).check()
    with pytest.raises(SweepError, match="must include the last epoch \\(3\\)"):
        small(train_options={"epochs": 3, "measure_epochs": (1, 2)}).check()


def test_epochs_are_a_whole_number_of_at_least_one():
    assert small(train_options={"epochs": 1}).epochs() == 1
    assert small(train_preset="demo").epochs() == TrainConfig.from_preset("demo").epochs
    for bad in (0, True, 1.0):
        with pytest.raises(SweepError, match="^train option --epochs: a whole number ≥ 1"):
            small(train_options={"epochs": bad}).epochs()


def test_the_difference_names_each_key_that_differs():
    first = small(lrs="0.1,0.2")
    other = small(lrs="0.1", train_options={"epochs": 2})
    assert other.difference(first) == [
        "lrs: [0.1, 0.2] there, [0.1] now",
        "train_options: {} there, {'epochs': 2} now",
    ]
    assert first.difference(first) == []


def test_check_resolves_each_cell_and_each_value_once(monkeypatch):
    # check() resolves each (dataset, network, loss) at the first run's rate and seed, and each
    # (loss, rate, seed) at the first run's dataset and network: every run's options, each once.
    calls = []
    from_preset = TrainConfig.from_preset.__func__

    def recorded(cls, preset=None, **options):
        calls.append(
            (options["dataset"], options["net"], options["loss"], options["lr"], options["seed"])
        )
        return from_preset(cls, preset, **options)

    monkeypatch.setattr(TrainConfig, "from_preset", classmethod(recorded))
    grid = small(datasets="mnist5k,svhn", nets="vgg,resnet18", losses="mse,ce", lrs="0.2,0.1")
    grid = dataclasses.replace(grid, seeds=(1, 0))
    config = grid.check()
    assert (config.dataset, config.net, config.loss, config.lr, config.seed) == (
        "mnist5k",
        "vgg11",
        "mse",
        0.2,
        1,
    )
    cells = [
        (d, n, loss, 0.2, 1)
        for d, nets in (("mnist5k", ("vgg11", "resnet18")), ("svhn", ("vgg13", "resnet18")))
        for n in nets
        for loss in ("mse", "ce")
    ]
    values = [
        ("mnist5k", "vgg11", loss, lr, s)
        for loss in ("mse", "ce")
        for lr in (0.2, 0.1)
        for s in (1, 0)
    ]
    # In run order; the first run is both a cell and a value, so resolved twice.
    assert sorted(calls) == sorted(cells + values)
    assert calls[:2] == [cells[0], values[0]]


def test_check_names_the_cell_whose_options_fail(monkeypatch):
    # One cell (not the first run's) refused: the error names that cell's first run.
    from_preset = TrainConfig.from_preset.__func__

    def failing(cls, preset=None, **options):
        if (options["dataset"], options["net"]) == ("svhn", "resnet18"):
            raise ValueError("net: refused here")
        return from_preset(cls, preset, **options)

    monkeypatch.setattr(TrainConfig, "from_preset", classmethod(failing))
    grid = small(datasets="mnist5k,svhn", nets="vgg,resnet18", lrs="0.01")
    with pytest.raises(SweepError, match="^run svhn-resnet18-mse-lr0.01-seed0: net: refused here$"):
        grid.check()
