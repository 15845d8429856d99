"""ncfast.integrations.lightning.NeuralCollapseCallback: measured through a forward hook during
validation (or on a given loader) at the chosen epochs, equal to NCMonitor on the same model and
batches, every scalar logged once; a 2-process DDP fit gives every rank the metrics of the whole
validation set, as one process measures them. Also runs examples/lightning_callback.py."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("sklearn")
L = pytest.importorskip("lightning")
import ncfast  # noqa: E402
from ncfast import mse_lambda  # noqa: E402
from ncfast.integrations.lightning import NeuralCollapseCallback, _RankShare  # noqa: E402
from ncfast.measure import scalars  # noqa: E402
from ncfast.monitor import NCMonitor  # noqa: E402
from tests.helpers.assertions import assert_same_metrics  # noqa: E402
from tests.helpers.lightning_example import EXAMPLE, example, trainer  # noqa: E402
from tests.helpers.tolerances import EPS, stream_tolerances  # noqa: E402

LAMBDA = mse_lambda(5e-4, 10)


def fitted(callbacks, epochs=3, seed=0, **kwargs):
    L.seed_everything(seed, verbose=False)
    train, val = example.digits(seed)
    model = example.DigitsMLP(0.1, 5e-4)
    fit = trainer(callbacks, epochs, **kwargs)
    fit.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=64),
    )
    return fit, model, train, val


def test_measures_validation_at_every_epoch_as_ncmonitor_does(seed):
    """During the last validation the model is the trained one: the callback's metrics equal
    NCMonitor.evaluate on the same loader, bit for bit (same features, same batches)."""
    callback = NeuralCollapseCallback("classifier", weight_decay=LAMBDA)
    fit, model, _, val = fitted([callback], epochs=3, seed=seed)
    assert [row["epoch"] for row in callback.history] == [0, 1, 2]  # no sanity-check pass
    expected = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(
        DataLoader(val, batch_size=64)
    )
    assert_same_metrics(callback.metrics, expected)
    assert callback.metrics["num_samples"] == len(val)
    logged = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("nc/")}
    assert logged == scalars(expected, "nc/")
    assert not model.classifier._forward_pre_hooks  # the hook lives only during a pass


def test_logs_every_scalar_once_per_chosen_epoch(tmp_path, seed):
    callback = NeuralCollapseCallback("classifier", epochs=[0, 2], prefix="val_nc/")
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fitted([callback], epochs=4, seed=seed, logger=logger)
    assert [row["epoch"] for row in callback.history] == [0, 2]
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val_nc/nc1")]
    assert [int(row["epoch"]) for row in rows] == [0, 2]
    for row, measured in zip(rows, callback.history, strict=True):
        want = scalars({k: v for k, v in measured.items() if k != "epoch"}, "val_nc/")
        assert len(want) >= 21 + 1  # every SPEC scalar and each SNR singular value
        assert {k: float(row[k]) for k in want} == want  # float64 written in full
    assert not [k for k in rows[0] if k.startswith("val_nc/") and k not in want]


def test_a_given_dataloader_is_measured_at_the_end_of_chosen_training_epochs(seed):
    train_ds, _ = example.digits(seed)
    loader = DataLoader(train_ds, batch_size=100)
    callback = NeuralCollapseCallback(
        "classifier", penultimate="body", dataloader=loader, epochs=lambda e: e % 2 == 1
    )
    fit, model, train, _ = fitted([callback], epochs=4, seed=seed)
    assert [row["epoch"] for row in callback.history] == [1, 3]
    expected = NCMonitor(model, model.classifier, model.body).evaluate(loader)
    assert_same_metrics(callback.metrics, expected)
    assert callback.metrics["num_samples"] == len(train)
    assert float(fit.callback_metrics["nc/nc1"]) == expected["nc1"]


def test_an_error_in_validation_removes_the_hook(seed):
    class NoForward(example.DigitsMLP):
        def validation_step(self, batch, batch_idx):
            pass  # the model never runs: the labels of the batch are never used

    L.seed_everything(seed, verbose=False)
    train, val = example.digits(seed)
    model = NoForward(0.1, 5e-4)
    with pytest.raises(ValueError, match="labels of the previous call were never used"):
        trainer([NeuralCollapseCallback()], 1, num_sanity_val_steps=0).fit(
            model, DataLoader(train, batch_size=64), DataLoader(val, batch_size=64)
        )
    assert not model.classifier._forward_pre_hooks


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="classifier must be an nn.Linear or the attribute path"):
        NeuralCollapseCallback(3)
    with pytest.raises(TypeError, match="epochs must be"):
        NeuralCollapseCallback(epochs=["one"])
    with pytest.raises(ValueError, match="epochs must be an integer ≥ 0"):
        NeuralCollapseCallback(epochs=[-1])
    with pytest.raises(TypeError, match="labels must be a function"):
        NeuralCollapseCallback(labels="y")
    with pytest.raises(ValueError, match="weight_decay"):
        NeuralCollapseCallback(weight_decay=-1.0)
    model = example.DigitsMLP(0.1, 0.0)
    with pytest.raises(ValueError, match=r"'head' is not a submodule of DigitsMLP.*classifier"):
        NeuralCollapseCallback("head").setup(None, model, "fit")
    with pytest.raises(TypeError, match="'body' of DigitsMLP is a Sequential, not an nn.Linear"):
        NeuralCollapseCallback("body").setup(None, model, "fit")
    shuffled = DataLoader(TensorDataset(torch.zeros(4, 1)), shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        _RankShare(shuffled, 0, 2)
    assert list(_RankShare(range(7), 1, 3)) == [1, 4]


@pytest.mark.slow  # imports pytorch_lightning as well: ~6 s
def test_works_with_the_pytorch_lightning_package(seed):
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.classifier(torch.tanh(self.body(x)))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(60) % 3
    data = TensorDataset(torch.randn(60, 5, generator=g) + labels[:, None], labels)
    callback = NeuralCollapseCallback()
    fit = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Tiny()
    fit.fit(model, DataLoader(data, batch_size=20), DataLoader(data, batch_size=20))
    assert [row["epoch"] for row in callback.history] == [0, 1]
    expected = NCMonitor(model, model.classifier).evaluate(DataLoader(data, batch_size=20))
    assert_same_metrics(callback.metrics, expected)
    assert float(fit.callback_metrics["nc/nc1"]) == expected["nc1"]


# ----------------------------------------------------------------------- the example
def test_example_runs_with_its_defaults_and_shows_collapse(capsys):
    history = example.main([])
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.split()[:2] == ["epoch", "samples"])
    assert [int(line.split()[0]) for line in printed[header + 1 :]] == list(range(8))
    assert [row["epoch"] for row in history] == list(range(8))
    for row in history:
        assert row["num_samples"] == example.VALIDATION and row["classes_present"] == 10
        assert all(math.isfinite(v) for v in scalars(row).values())
    # Training on the digits collapses the validation features (seed 0; a large trend).
    assert history[-1]["nc1"] < 0.5 * history[0]["nc1"]


@pytest.mark.slow  # two DDP processes importing torch and Lightning: ~15 s on 2 cores
def test_ddp_on_two_processes_gives_every_rank_the_one_process_metrics(tmp_path, seed):
    """examples/lightning_callback.py --devices 2 (DDP, gloo): each rank validates half of the
    360 held-out digits; every rank's measurements are identical and hold all 360, equal to one
    process measuring the trained model on the whole set; rank 0 alone writes the log."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if env.get("MUTANT_UNDER_TEST") == "stats":
        # mutmut's stats run: its recorder needs mutmut's config, which a process started in
        # tmp_path cannot find; a mutant (a name) runs there as in the test's own process.
        del env["MUTANT_UNDER_TEST"]
    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--devices",
            "2",
            "--epochs",
            "3",
            "--log-dir",
            str(tmp_path / "logs"),
            "--history",
            str(tmp_path / "history"),
            "--save-model",
            str(tmp_path / "model.pt"),
            "--seed",
            str(seed),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"history.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the same reduced statistics on both ranks, bit for bit
    assert [row["epoch"] for row in ranks[0]] == [0, 1, 2]
    assert all(row["num_samples"] == example.VALIDATION for row in ranks[0])

    model = example.DigitsMLP(0.1, 5e-4).double()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    _, val = example.digits(seed)
    one_process = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(
        DataLoader(val, batch_size=64)
    )
    features, labels = model.body(val.tensors[0]).detach(), val.tensors[1]
    rtol = two_streams_rtol(features, labels)
    want = scalars(one_process)
    got = {k: v for k, v in ranks[0][-1].items() if k != "epoch"}
    assert set(got) == set(want)
    assert (
        got["sigma_w_rank"] == want["sigma_w_rank"]
        and got["nc4_ncc_mismatch"] == want["nc4_ncc_mismatch"]
    )
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-14), key

    logs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(logs) == 1  # written once, by rank 0
    with open(logs[0]) as f:
        rows = [row for row in csv.DictReader(f) if row.get("nc/nc1")]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    for row, measured in zip(rows, ranks[0], strict=True):
        assert float(row["nc/nc1"]) == measured["nc1"]


def two_streams_rtol(features, labels) -> float:
    """Relative bound for the metrics of two float64 streams of the same features (the ranks'
    shards reduced, one process's batches). ×10 for the products that follow; must stay sharp
    (< 1e-3).

    - SNR, which inverts Σ_W on its range. ReLU features have units of very different scales
      (λ_min⁺ of Σ_W ~ 1e-9 of λ_max), so the error of each stream's Σ_W is bounded entrywise:
      |δΣ_ij| ≤ 2·eps·(max|h_i|·max|d_j| + max|d_i|·max|h_j|) + N·eps·max|d_i|·max|d_j|
      (d = h − μ_y; :func:`stream_tolerances` per coordinate), and with D = diag(Σ_W)^{1/2} over
      the active units, Σ_W = D A D moves relatively by ‖D⁻¹ δΣ D⁻¹‖/λ_min⁺(A) (Demmel–Veselić;
      MᵀΣ_W⁻¹M = (D⁻¹M)ᵀA⁻¹(D⁻¹M)). Each stream's own eigh of Σ_W adds a backward error of
      P·eps·λ_max, relative to λ_min⁺ of Σ_W.
    - NC1 through Σ_B^†: 2·δμ/σ_min(M̄).
    """
    x = features.to(torch.float64)
    atol_means, _ = stream_tolerances(features, labels)
    stats = ncfast.ClassStats(10, x.shape[1])
    stats.update(x, labels)
    sigma_w = stats.sigma_w
    deviations = x - stats.class_means[labels]
    scale = torch.diagonal(sigma_w)
    active = scale > 0  # dead units are exactly 0 in both streams
    h_max = x.abs().max(0).values[active]
    d_max = deviations.abs().max(0).values[active]
    entrywise = 2 * EPS * (h_max[:, None] * d_max + d_max[:, None] * h_max)
    entrywise += len(labels) * EPS * d_max[:, None] * d_max
    d_inv = scale[active].rsqrt()
    scaled_error = 2 * float((d_inv[:, None] * entrywise * d_inv).norm())  # two streams
    scaled = d_inv[:, None] * sigma_w[active][:, active] * d_inv
    eigenvalues = torch.linalg.eigvalsh(sigma_w)
    cutoff = x.shape[1] * EPS * float(eigenvalues.max())
    kept = eigenvalues[eigenvalues > cutoff]
    # Exactly collinear units (a null space of A, below every cutoff) are dropped by both
    # streams alike (sigma_w_rank is compared exactly): λ_min(A) over the kept directions.
    scaled_eigenvalues = torch.linalg.eigvalsh(scaled)
    scaled_min = scaled_eigenvalues[
        scaled_eigenvalues > len(scaled) * EPS * scaled_eigenvalues.max()
    ].min()
    snr = scaled_error / float(scaled_min) + 2 * cutoff / float(kept.min())
    sigma = torch.linalg.svdvals(stats.centered_means)
    sigma_min = sigma[sigma > 1e-10 * sigma[0]].min()
    rtol = 10 * (snr + 2 * atol_means / float(sigma_min))
    assert rtol < 1e-3, f"features too ill-conditioned for a sharp check (rtol {rtol:.1e})"
    return rtol


def test_online_every_measures_the_training_batches_of_each_window(seed):
    """At learning rate 0 (no batch norm, no dropout) every training forward pass computes the
    trained network: a window of one epoch (23 batches of 64 of the 1437 training digits) gives
    NCMonitor.evaluate of the training set, up to the summation order of the float64
    statistics (~N·eps relative, times the conditioning of Σ_W and M̄: 1e-10 asserted). NC4 of
    the second window uses the first window's means (the same): the eval-mode count."""
    L.seed_everything(seed, verbose=False)
    train, val = example.digits(seed)
    model = example.DigitsMLP(0.0, 5e-4)
    callback = NeuralCollapseCallback("classifier", weight_decay=LAMBDA, online_every=23)
    fit = trainer([callback], 2)
    fit.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=64))
    assert [(r["step"], r["epoch"]) for r in callback.online_history] == [(23, 1.0), (46, 2.0)]
    expected = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(
        DataLoader(train, batch_size=100)
    )
    first, second = callback.online_history
    assert "nc4_ncc_mismatch" not in first
    assert second["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    for row in (first, second):
        assert row["num_samples"] == len(train) and row["window_steps"] == 23
        for key, want in scalars(expected).items():
            if key in scalars(row) and key != "nc4_ncc_mismatch":
                got = scalars(row)[key]
                assert abs(got - want) <= 1e-10 * max(abs(want), 1e-300), (key, got, want)
    logged = float(fit.callback_metrics["nc/train_online/nc1"])
    assert logged == second["nc1"]
    assert not model.classifier._forward_pre_hooks  # the watch is closed at the end of fit


def test_online_every_is_checked():
    with pytest.raises(ValueError, match="online_every"):
        NeuralCollapseCallback("classifier", online_every=-1)


def test_a_validation_set_of_one_class_logs_nan_with_its_reason(seed):
    """Issue 19 item 18: the metrics of one class are undefined; the fit goes on, NaN is logged
    with the reason in a warning and the history."""
    L.seed_everything(seed, verbose=False)
    train, val = example.digits(seed)
    features, labels = val.tensors
    one_class = TensorDataset(features[labels == 3], labels[labels == 3])
    callback = NeuralCollapseCallback(epochs=[0])
    with pytest.warns(RuntimeWarning, match="undefined at epoch 0.*1 of 10 classes"):
        trainer([callback], 1).fit(
            example.DigitsMLP(0.1, 5e-4),
            DataLoader(train, batch_size=64),
            DataLoader(one_class, batch_size=64),
        )
    assert math.isnan(callback.metrics["nc1"])
    assert "1 of 10 classes" in callback.history[0]["nc_undefined"]
