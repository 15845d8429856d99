"""Saved and merged accumulator states are checked before anything changes (issue 19, items 9
and 18): every surface that takes a state (ClassStats and Measurement load_state_dict, the
torchmetrics metric's merge_state and load_state_dict) refuses each kind of bad state with one
InvalidStateError and is left exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch

import ncfast
from ncfast.stats import ClassStats, InvalidStateError
from tests.helpers.feeding import stream
from tests.helpers.synthetic_features import make_data


def _bad_states(good: dict) -> dict[str, tuple[dict, str]]:
    """Each way a ClassStats state can be wrong: (the state, a regex of the error)."""

    def edited(key, value):
        return {**good, key: value}

    c, p = good["shift"].shape
    return {
        "other C": (
            edited("counts", torch.zeros(c + 2, dtype=torch.int64)),
            rf"counts \[{c + 2}\]",
        ),
        "other P": (edited("scatter", torch.zeros(p + 1, p + 1)), rf"scatter \[{p + 1}, {p + 1}\]"),
        "NaN sums": (
            edited("sums", torch.full_like(good["sums"], math.nan)),
            "'sums' contains NaN",
        ),
        "inf scatter": (edited("scatter", good["scatter"] + math.inf), "'scatter' contains NaN"),
        "negative count": (edited("counts", good["counts"] - 100), "'counts' must hold counts"),
        "fractional count": (
            edited("counts", good["counts"].double() + 0.5),
            r"'counts' must hold counts \(whole",
        ),
        "negative invalid": (edited("invalid", torch.tensor([-1, 0])), "'invalid' must hold"),
        "not a tensor": (edited("shift", [[0.0] * p] * c), r"shift \(list\)"),
        "missing key": ({k: v for k, v in good.items() if k != "scatter"}, "lacks.*'scatter'"),
    }


def _snapshot(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.fixture
def data(seed):
    return make_data([10, 12, 9], 4, seed)


def test_classstats_and_measurement_refuse_bad_states_unchanged(data):
    features, labels, weight, bias = data
    target = stream(features, labels, 3, 8, weight, bias)
    before_stats, before_nc4 = _snapshot(target.stats.state_dict()), target.ncc.state_dict()
    good = stream(features[:20], labels[:20], 3, 8).stats.state_dict()
    for name, (bad, match) in _bad_states(good).items():
        with pytest.raises(InvalidStateError, match=match):
            ClassStats(3, 4).load_state_dict(bad)
        # Measurement: a good NC4 part with a bad stats part, and the reverse.
        state = {"stats": bad, "nc4": stream(features, labels, 3, 8, weight, bias).ncc.state_dict()}
        with pytest.raises(InvalidStateError, match=match):
            target.load_state_dict(state)
        _assert_same(before_stats, target.stats.state_dict())
        assert len(target.ncc.state_dict()["features"]) == len(before_nc4["features"]), name
    bad_nc4 = {"features": [torch.zeros(2, 5)], "valid": [torch.ones(2, dtype=torch.bool)]}
    with pytest.raises(InvalidStateError, match=r"\[B, 4\] tensors"):
        target.load_state_dict({"stats": good, "nc4": {**bad_nc4, "overflowed": False}})
    _assert_same(before_stats, target.stats.state_dict())
    with pytest.raises(InvalidStateError, match="num_classes=4, dim=4"):
        target.merge(stream(features, labels, 4, 8))
    _assert_same(before_stats, target.stats.state_dict())


def test_torchmetrics_merge_and_load_refuse_bad_states_unchanged(data):
    pytest.importorskip("torchmetrics")
    from ncfast.integrations.torchmetrics import NeuralCollapse

    features, labels, weight, bias = data
    metric = NeuralCollapse(3, 4, (weight, bias))
    metric.update(features, labels)
    before = {k: v.clone() for k, v in metric.metric_state.items() if isinstance(v, torch.Tensor)}
    buffered = len(metric.nc4_features)

    def assert_unchanged():
        for key, value in before.items():
            assert torch.equal(value, getattr(metric, key)), key
        assert len(metric.nc4_features) == buffered

    good = dict(NeuralCollapse(3, 4, (weight, bias)).metric_state)
    for bad, match in _bad_states(
        {k: good[k] for k in ("counts", "shift", "sums", "scatter", "invalid")}
    ).values():
        with pytest.raises(InvalidStateError, match=match):
            metric.merge_state({**{k: v for k, v in good.items() if k not in _STATS}, **bad})
        assert_unchanged()
    # Another C or P: both shapes named; a metric without the classifier (no NC4 buffer).
    for other, match in [
        (NeuralCollapse(6, 4), r"counts \[6\].*num_classes=3, dim=4 need counts \[3\]"),
        (NeuralCollapse(3, 5), r"scatter \[5, 5\].*dim=4 need.*scatter \[4, 4\]"),
        (NeuralCollapse(3, 4), "lacks \\['nc4_features'"),
    ]:
        other.update(torch.randn(5, other.dim), torch.arange(5) % other.num_classes)
        with pytest.raises(InvalidStateError, match=match):
            metric.merge_state(other)
        assert_unchanged()
    # load_state_dict of persistent states from a 6-class metric.
    six = NeuralCollapse(6, 4)
    six.persistent(True)
    with pytest.raises(InvalidStateError, match=r"counts \[6\]"):
        metric.load_state_dict(six.state_dict(), strict=False)
    assert_unchanged()
    # The classifier-less metric itself merges fine with the same shapes.
    plain = NeuralCollapse(3, 4)
    plain.merge_state(NeuralCollapse(3, 4))
    assert torch.equal(
        ncfast.ClassStats.wrap(dict(plain.metric_state)).counts, torch.zeros(3, dtype=torch.int64)
    )


_STATS = ("counts", "shift", "sums", "scatter", "invalid")
