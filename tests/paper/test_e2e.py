"""The paper's workload end to end (SPEC §6), through the command line as a user runs it.

Tiny files in each dataset's real on-disk format (:mod:`tests.data_fixtures`); for each dataset
the three networks of HPD22 Table A.2 at that dataset's depth (``--net vgg|resnet|densenet``),
trained 2 epochs with ``mse``, plus ``ce`` and ``mse-rescaled`` on one pair each; every run then
through ``ncfast analyze`` with DeepFool on, and all of them together through ``ncfast plot``
and ``ncfast table``. The checks read the files the commands write, not only their exit codes.

Every test is marked ``e2e``: ``pytest -m "not e2e"`` is the fast lane. Runs are trained on
first use and shared (module scope), so a single case can be selected with ``-k``.
"""

from __future__ import annotations

import csv
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncfast.cli import main
from ncfast.metrics import SPEC_KEYS
from ncfast.paper.checkpoint import load_checkpoint
from ncfast.paper.config import TrainConfig
from ncfast.paper.losses import compute_loss, parse_mse_scale
from ncfast.paper.models import FAMILIES, paper_net
from ncfast.paper.train import build_model, load_data
from ncfast.report.plots import FIGURE_NAMES
from tests.helpers import data_fixtures
from tests.helpers.seeds import draw_seed
from tests.helpers.tiny_runs import read_rows

pytestmark = [
    pytest.mark.e2e,
    # The fixture files are random bytes, not the official releases: the loader says so.
    pytest.mark.filterwarnings("ignore::ncfast.paper.data.errors.DatasetChecksumWarning"),
]

DATASETS = ("mnist", "fashionmnist", "svhn", "cifar10", "stl10")
# (channels, side) the networks see: MNIST and FashionMNIST padded by 2 to 32×32 (SPEC §6).
INPUT_SHAPES = {
    "mnist": (1, 32),
    "fashionmnist": (1, 32),
    "svhn": (3, 32),
    "cifar10": (3, 32),
    "stl10": (3, 96),
}
EPOCHS = 2
# Small enough for the whole lane to take minutes on 2 cores, large enough that every network
# keeps more features than classes (P ≥ 11 > C − 1 = 9 at this width, DenseNet40 the smallest).
WIDTH = 0.0625
PER_CLASS = 3  # the rarest class of the fixture files has 3 training images
BATCH_SIZE = 10  # 3 SGD steps per epoch, every batch full (batch norm sees 10 images)
ROBUSTNESS_SAMPLES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT32_EPS = float(np.finfo(np.float32).eps)
# SPEC keys that are lists rather than scalars.
LIST_KEYS = ("snr_singular_values",)
SCALAR_KEYS = tuple(k for k in SPEC_KEYS if k not in LIST_KEYS)


@dataclass(frozen=True)
class Case:
    dataset: str
    family: str
    loss: str = "mse"
    mse_scale: str | None = None

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.family}-{self.loss}"

    @property
    def net(self) -> str:
        return paper_net(self.dataset, self.family)


CASES = (
    *(Case(dataset, family) for dataset in DATASETS for family in FAMILIES),
    Case("cifar10", "vgg", "ce"),
    Case("svhn", "vgg", "mse-rescaled", "1,15"),
)


@dataclass
class Outcome:
    run_dir: Path
    train_seconds: float
    analyze_seconds: float
    train_cpu_seconds: float
    analyze_cpu_seconds: float
    analyze_output: str


def ncfast(*args: str) -> str:
    """Run ``ncfast ARGS`` through its click entry point; its output, or a failure that shows
    the command, its output and the traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != 0:
        trace = ""
        if result.exc_info is not None and not isinstance(result.exception, SystemExit):
            trace = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(
            f"ncfast {' '.join(map(str, args))} exited with {result.exit_code}:\n"
            f"{result.output}\n{trace}",
            pytrace=False,
        )
    return result.output


class Matrix:
    """The runs of :data:`CASES`, each trained and analysed on first request."""

    def __init__(self, root: Path, seed: int):
        self.root = root
        self.seed = seed
        self.data_root = root / "data"
        rng = np.random.default_rng(seed)
        for dataset in DATASETS:
            data_fixtures.WRITERS[dataset](self.data_root, rng)
        self._outcomes: dict[Case, Outcome | str] = {}

    def outcome(self, case: Case) -> Outcome:
        if case not in self._outcomes:
            try:
                self._outcomes[case] = self._run(case)
            except BaseException as exc:  # pytest.fail raises an OutcomeException
                self._outcomes[case] = f"{case.name} failed: {exc}"
                raise
        outcome = self._outcomes[case]
        if isinstance(outcome, str):
            pytest.fail(f"earlier in this session: {outcome}", pytrace=False)
        return outcome

    def _run(self, case: Case) -> Outcome:
        run_dir = self.root / "runs" / case.name
        scale = ("--mse-scale", case.mse_scale) if case.mse_scale else ()
        start, start_cpu = time.perf_counter(), time.process_time()
        ncfast(
            "train",
            "--dataset", case.dataset,
            "--net", case.family,
            "--loss", case.loss,
            *scale,
            "--data-root", self.data_root,
            "--out", run_dir,
            "--epochs", EPOCHS,
            "--width", WIDTH,
            "--per-class", PER_CLASS,
            "--batch-size", BATCH_SIZE,
            "--measure-epochs", "all",
            "--seed", self.seed,
            "--quiet",
        )  # fmt: skip
        trained, trained_cpu = time.perf_counter(), time.process_time()
        output = ncfast(
            "analyze",
            run_dir / "checkpoint.pt",
            "--robustness-samples", ROBUSTNESS_SAMPLES,
            "--robustness-seed", self.seed,
            "--format", "png",
            "--quiet",
        )  # fmt: skip
        analyzed, analyzed_cpu = time.perf_counter(), time.process_time()
        return Outcome(
            run_dir,
            trained - start,
            analyzed - trained,
            trained_cpu - start_cpu,
            analyzed_cpu - trained_cpu,
            output,
        )


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, one_thread) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("e2e"), draw_seed())


@pytest.fixture(autouse=True)
def _report_matrix_seed(request, matrix):
    # The module's seed, named in a failure's report (tests/conftest.py) like the seed fixture's.
    request.node.user_properties.append(("seed", matrix.seed))


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_png(path: Path) -> None:
    """A PNG file that decodes to an image with more than one colour (something was drawn)."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100, (path, pixels.shape)
    assert np.ptp(pixels[..., :3]) > 0, f"{path} is blank"


def check_measurement(record: dict, split: str, where: str) -> None:
    """One split's measurement: every SPEC key, with finite numbers where it is defined (the
    networks keep P ≥ C − 1 and all 10 classes are present; the SNR needs Σ_W ≠ 0)."""
    expected_samples = PER_CLASS * 10 if split == "train" else None
    for key in (*(k for k in SCALAR_KEYS if k != "snr_condition"), "error", "loss"):
        assert is_number(record.get(key)), (where, split, key, record.get(key))
    assert 0 <= record["error"] <= 1, (where, split, record["error"])
    assert record["classes_present"] == 10, (where, split)
    if expected_samples is not None:
        assert record["num_samples"] == expected_samples, (where, split)
    snr = record["snr_singular_values"]
    if record["sigma_w_rank"] == 0:
        # One image per class (the STL10 fixture's test split): Σ_W = 0, nothing to whiten by.
        assert snr == [] and not is_number(record["snr_condition"]), (where, split, record)
        return
    assert is_number(record["snr_condition"]), (where, split, record["snr_condition"])
    # SPEC §4: the nonzero singular values of Σ_W^{-1/2} M̄, at most rank Σ_W and rank M̄ ≤ C − 1
    # of them (fewer where ReLU features of these tiny networks are dead on every image).
    rank = min(record["sigma_w_rank"], record["sigma_b_rank"])
    assert record["sigma_b_rank"] <= 9 and 1 <= len(snr) <= rank, (where, split, snr, rank)
    assert all(is_number(v) and v > 0 for v in snr), (where, split, snr)
    assert snr == sorted(snr, reverse=True), (where, split, snr)


def losses_of_checkpoint(run_dir: Path, case: Case) -> dict[str, float]:
    """The loss ``case.loss`` of the checkpoint's network on each split, computed here from
    its weights and the dataset files (eval mode, one batch per split, float64 loss)."""
    payload = load_checkpoint(run_dir / "checkpoint.pt", map_location="cpu")
    config = TrainConfig.from_json({**payload["config"], "device": "cpu"})
    splits = dict(zip(("train", "test"), load_data(config), strict=True))
    model = build_model(config, 10, splits["train"].channels, splits["train"].image_size)
    model.load_state_dict(payload["model"])
    model.eval()
    scale = parse_mse_scale(case.mse_scale)
    losses = {}
    for name, data in splits.items():
        layout = torch.channels_last if config.channels_last else torch.contiguous_format
        images, labels = data.batch(torch.arange(len(data.labels)), memory_format=layout)
        with torch.no_grad():
            logits = model(images).double()
        losses[name] = float(compute_loss(case.loss, logits, labels, scale))
    return losses


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_then_analyze(matrix, case):
    outcome = matrix.outcome(case)
    run_dir = outcome.run_dir
    print(
        f"{case.name} ({case.net}): train {outcome.train_seconds:.1f} s "
        f"(CPU {outcome.train_cpu_seconds:.1f} s), analyze {outcome.analyze_seconds:.1f} s "
        f"(CPU {outcome.analyze_cpu_seconds:.1f} s)"
    )

    # train: the configuration resolved to the paper's network for this dataset
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["dataset"], config["net"], config["loss"]) == (case.dataset, case.net, case.loss)
    assert config["epochs"] == EPOCHS and config["train_samples"] == PER_CLASS * 10
    assert (config["in_channels"], config["image_size"]) == INPUT_SHAPES[case.dataset]

    # train: metrics.jsonl holds both splits at epochs 1 and 2, every key finite
    records = read_rows(run_dir)
    assert sorted((r["epoch"], r["split"]) for r in records) == [
        (1, "test"),
        (1, "train"),
        (2, "test"),
        (2, "train"),
    ]
    for record in records:
        check_measurement(record, record["split"], f"metrics.jsonl epoch {record['epoch']}")
    # The logged loss is the one asked for (ce, mse, mse-rescaled with its k, M) on the
    # checkpoint's weights. The log's is a float32 mean of at most N·C = 300 terms: relative
    # rounding ≤ 300·eps32 ≈ 4e-5, while the three losses differ by factors of 10 here.
    recomputed = losses_of_checkpoint(run_dir, case)
    for record in records:
        if record["epoch"] == EPOCHS:
            expected = recomputed[record["split"]]
            assert record["loss"] == pytest.approx(expected, rel=300 * FLOAT32_EPS), record["split"]
    assert (run_dir / "checkpoint.pt").stat().st_size > 0

    # analyze: report.json measures the checkpoint (epoch 2) as the log did
    analysis = run_dir / "analysis"
    report = json.loads((analysis / "report.json").read_text())
    assert report["epoch"] == EPOCHS
    assert report["config"]["net"] == case.net
    by_split = {r["split"]: r for r in records if r["epoch"] == EPOCHS}
    for split in ("train", "test"):
        measured = report["splits"][split]
        check_measurement(measured, split, "report.json")
        assert measured["num_samples"] == by_split[split]["num_samples"]
        # Same weights, data and function (ncfast.paper.evaluate.measure_split), same device:
        # identical
        # on a CPU (0 measured); the slack is for a GPU's run-to-run choice of float32 kernels.
        agreement = report["agreement_with_log"][split]
        assert agreement["max_relative_difference"] <= 1e-6, (split, agreement["worst_key"])
        decomposition = report["decomposition"][split]
        # SPEC §3: the identity holds for any features, to float64 relative error ≤ 1e-10.
        assert decomposition["identity_relative_error"] <= 1e-10, decomposition
        assert report["snr_singular_values"][split] == measured["snr_singular_values"]

    # analyze: DeepFool (HPD22 Fig. 9) ran on the seeded sample
    robustness = report["robustness"]
    assert robustness["robustness_samples"] == ROBUSTNESS_SAMPLES
    assert robustness["robustness_seed"] == matrix.seed
    for key in ("robustness", "robustness_tight"):
        assert is_number(robustness[key]) and robustness[key] >= 0, (key, robustness[key])
    if robustness["robustness_not_fooled"] < ROBUSTNESS_SAMPLES:  # a fooled image moved: r ≠ 0
        assert robustness["robustness"] > 0 and robustness["robustness_tight"] > 0
    # SPEC §7: s* ≤ 1.02, the overshoot of the reported r; the reported r = 1.02·r is rounded
    # to float32 once before its norm, the tight one is not.
    assert robustness["robustness_tight"] <= robustness["robustness"] * (1 + FLOAT32_EPS)
    assert 0 <= robustness["robustness_out_of_range"] <= 1
    assert "DeepFool" in outcome.analyze_output

    # analyze: summary.md and every figure of the run
    summary = (analysis / "summary.md").read_text()
    assert f"{case.dataset} · {case.net} · {case.loss}" in summary
    assert "| | train | test |" in summary
    figures = [Path(p) for p in report["files"]["figures"]]
    assert sorted(p.name for p in figures) == sorted(f"{n}.png" for n in FIGURE_NAMES)
    for path in figures:
        check_png(path)
        assert f"![{path.stem}](figures/{path.name})" in summary


def test_plot_and_table_of_all_runs(matrix, tmp_path):
    run_dirs = [matrix.outcome(case).run_dir for case in CASES]

    output = ncfast("plot", *run_dirs, "--out", tmp_path / "figures", "--format", "png")
    written = sorted((tmp_path / "figures").iterdir())
    # The runs log no robustness (train --robustness-samples 0), so no robustness figure.
    assert [p.name for p in written] == sorted(
        f"{n}.png" for n in FIGURE_NAMES if n != "robustness"
    )
    assert f"from {len(CASES)} run(s)" in output
    for path in written:
        check_png(path)

    ncfast("table", *run_dirs, "--out", tmp_path / "table")
    markdown = (tmp_path / "table" / "table1.md").read_text()
    with open(tmp_path / "table" / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [p.name for p in run_dirs]
    for case, row, run_dir in zip(CASES, rows, run_dirs, strict=True):
        assert (row["dataset"], row["net"], row["loss"]) == (case.dataset, case.net, case.loss)
        assert f"| {case.dataset} | {case.net} | {case.loss} | {run_dir.name} |" in markdown
        # Table 1's final accuracy is 100·(1 − test error) at the last measured epoch; the same
        # float64 expression, and CSV writes floats as their round-tripping repr: exact.
        last = {(r["epoch"], r["split"]): r for r in read_rows(run_dir)}[EPOCHS, "test"]
        test_error = last["error"]
        assert int(row["final_epoch"]) == EPOCHS
        assert float(row["acc_final"]) == 100.0 * (1.0 - test_error)
