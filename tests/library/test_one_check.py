"""Each batch is checked, and its rows' validity computed, once on the way down (issue 20):
Measurement.update (and the torchmetrics metric) hand the checked batch and its validity mask
to the statistics and to NC4's buffer, and the classifier is checked once at construction."""

from __future__ import annotations

import pytest
import torch

import ncfast
import ncfast.integrations
import ncfast.measure
import ncfast.nc4
import ncfast.stats
from tests.helpers.synthetic_features import make_data


def _counting(monkeypatch, modules, name):
    calls = []
    for module in modules:
        if not hasattr(module, name):
            continue
        original = getattr(module, name)

        def counted(*args, _original=original, **kwargs):
            calls.append(name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_measurement_checks_each_batch_and_its_rows_once(monkeypatch, seed):
    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    modules = (ncfast.measure, ncfast.nc4, ncfast.stats)
    classifier = _counting(monkeypatch, modules, "check_classifier")
    measurement = ncfast.Measurement(3, 4, weight, bias)
    assert len(classifier) == 1
    batches = _counting(monkeypatch, modules, "check_batch")
    rows = _counting(monkeypatch, (ncfast.nc4, ncfast.stats), "count_invalid_rows_")
    measurement.update(features, labels)
    assert (len(batches), len(rows)) == (1, 1)
    plain = ncfast.Measurement(3, 4)  # no NC4: the statistics' own CPU check, once
    plain.update(features, labels)
    assert (len(batches), len(rows)) == (2, 2)
    # The shared mask still rejects a bad batch before anything is kept.
    bad = features.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ncfast.InvalidInputError, match="1 sample"):
        measurement.update(bad, labels)
    assert measurement.stats.num_samples == len(labels)
    assert len(measurement.ncc.buffer.features) == 1


def test_the_torchmetrics_metric_computes_the_rows_validity_once(monkeypatch, seed):
    pytest.importorskip("torchmetrics")
    from ncfast.integrations.torchmetrics import NeuralCollapse

    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    metric = NeuralCollapse(3, 4, (weight, bias))
    rows = _counting(monkeypatch, (ncfast.nc4, ncfast.stats), "count_invalid_rows_")
    metric.update(features, labels)
    assert len(rows) == 1
    assert len(metric.nc4_features) == 1 and torch.equal(
        metric.nc4_valid[0], torch.ones(31, dtype=torch.bool)
    )
