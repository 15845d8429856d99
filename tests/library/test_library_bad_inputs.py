"""Bad inputs to the library and its integrations (issue 19, items 14, 17, 18, 20): one clear
NCFastError (or a NaN row with its reason) instead of a traceback from deep inside."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ncfast
from ncfast import theory
from ncfast.errors import NCFastError
from ncfast.monitor import NCMonitor
from tests.helpers.feeding import stream
from tests.helpers.synthetic_features import make_data


@pytest.mark.parametrize("with_classifier", [False, True])
def test_features_whose_squares_overflow_float64_are_named(seed, with_classifier):
    """Features of 1e200: Σ_W overflows to inf; the error says so (not torch's _LinAlgError)."""
    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    classifier = (weight, bias) if with_classifier else (None, None)
    measurement = stream(features * 1e200, labels, 3, 8, *classifier)
    with pytest.raises(ncfast.DegenerateFeaturesError, match="too large for float64.*rescale"):
        measurement.compute()
    with pytest.raises(ncfast.DegenerateFeaturesError, match="whiten: the features are too large"):
        ncfast.whiten(measurement.stats)


def test_simulation_step_that_overflows_names_dt_not_a_singular_sigma_w(seed):
    x = theory.initial_features(3, 5, 4, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(theory.SimulationOverflowError, match=r"dt=1e\+300 .* overflow float64"):
        theory.simulate_central_path(x, 3, 2, dt=1e300)
    assert issubclass(theory.SimulationOverflowError, NCFastError)
    # A sane step still runs.
    assert theory.simulate_central_path(x, 3, 1, dt=1.0).omega.isfinite().all()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4).double()
        self.classifier = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.classifier(self.body(x))


def _nan_batch():
    features = torch.randn(6, 4, dtype=torch.float64)
    features[2] = math.nan
    return features, torch.tensor([0, 1, 2, 0, 1, 2])


def _classstats(batch):
    ncfast.ClassStats(3, 4).update(*batch)


def _measurement(batch):
    ncfast.Measurement(3, 4).update(*batch)


def _monitor(batch):
    net = _Net()
    NCMonitor(net, net.classifier).evaluate([batch])


def _training_watch(batch):
    net = _Net()
    with NCMonitor(net, net.classifier).watch_training(every=1) as watch:
        watch.labels(batch[1])
        net(batch[0])


def _torchmetrics(batch):
    pytest.importorskip("torchmetrics")
    from ncfast.integrations.torchmetrics import NeuralCollapse

    NeuralCollapse(3, 4).update(*batch)


def _lightning(batch):
    pytest.importorskip("lightning")
    from ncfast.integrations.lightning import NeuralCollapseCallback

    net = _Net()
    callback = NeuralCollapseCallback()
    callback.setup(None, net, "fit")
    callback.monitor.evaluate([batch])


@pytest.mark.parametrize(
    ("feed", "advice"),
    [
        (_classstats, "ClassStats(..., on_invalid='skip')"),
        (_measurement, "Measurement(..., on_invalid='skip')"),
        (_monitor, "NCMonitor(..., on_invalid='skip')"),
        (_training_watch, "NCMonitor(..., on_invalid='skip')"),
        (_torchmetrics, "NeuralCollapse(..., on_invalid='skip')"),
        (_lightning, "NeuralCollapseCallback(..., on_invalid='skip')"),
    ],
)
def test_invalid_samples_are_reported_in_the_terms_of_the_surface_called(feed, advice):
    """Each surface's users are told the argument they pass, not to create a ClassStats."""
    with pytest.raises(ncfast.InvalidInputError) as caught:
        feed(_nan_batch())
    message = str(caught.value)
    assert "1 sample(s) with non-finite" in message
    assert f"pass {advice}" in message
    if not advice.startswith("ClassStats"):
        assert "ClassStats(" not in message


def _one_class_batch():
    return torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.int64)


def test_undefined_metrics_are_one_policy_a_nan_row_with_its_reason(seed):
    """on_degenerate="nan" (Measurement, NCMonitor, the torchmetrics metric): one class, a
    collapsed point and a NaN classifier each give NaN metrics and the reason; "raise" raises."""
    features, labels = _one_class_batch()
    measurement = ncfast.Measurement(3, 4, torch.randn(3, 4, dtype=torch.float64))
    measurement.update(features, labels)
    with pytest.raises(ValueError, match="at least two classes"):
        measurement.compute()
    row = measurement.compute(on_degenerate="nan")
    assert "1 of 3 classes had samples" in row["nc_undefined"]
    assert math.isnan(row["nc1"]) and math.isnan(row["nc4_ncc_mismatch"])
    assert row["num_samples"] == 6
    with pytest.raises(ValueError, match="on_degenerate must be one of"):
        measurement.compute(on_degenerate="skip")
    point = ncfast.Measurement(3, 4)
    point.update(torch.ones(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    assert "do not separate" in point.compute(on_degenerate="nan")["nc_undefined"]
    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    diverged = stream(features, labels, 3, 8, weight * math.nan, bias)
    assert "not finite" in diverged.compute(on_degenerate="nan")["nc_undefined"]

    net = _Net()
    monitor = NCMonitor(net, net.classifier, on_degenerate="nan")
    assert "1 of 3 classes" in monitor.evaluate([_one_class_batch()])["nc_undefined"]
    with pytest.raises(ValueError, match="at least two classes"):
        NCMonitor(net, net.classifier).evaluate([_one_class_batch()])


def test_torchmetrics_metric_follows_the_same_policy():
    pytest.importorskip("torchmetrics")
    from ncfast.integrations.torchmetrics import NeuralCollapse

    metric = NeuralCollapse(3, 4, torch.randn(3, 4, dtype=torch.float64), on_degenerate="nan")
    metric.update(*_one_class_batch())
    result = metric.compute()
    assert "1 of 3 classes" in result["nc_undefined"]
    assert torch.isnan(result["nc1"]) and torch.isnan(result["nc4_ncc_mismatch"])
    with pytest.raises(ValueError, match="on_degenerate"):
        NeuralCollapse(3, 4, on_degenerate="ignore")
