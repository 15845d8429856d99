"""Guards of ncfast/measure.py that mutmut found missing (issue 21): Measurement's merge, reset,
state_dict and load_state_dict (their checks, messages and what they restore) and scalars'
conversions (overflowing integers, numpy arrays, lists with None, 0-d tensors, text). Each test
fails on the surviving mutants that bench/results/mutation.md lists with it (checked by running
the mutant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncfast.measure import Measurement, scalars
from ncfast.stats import InvalidStateError
from tests.helpers.synthetic_features import F64, make_data

LOAD = r"^Measurement\.load_state_dict: "
MERGE = r"^Measurement\.merge: "


def halves(seed: int, classifier: bool = True) -> tuple[Measurement, Measurement, torch.Tensor]:
    """Two measurements of 3 classes in 4 dims, each fed half of one data set (with the same
    classifier, or none), and the features they were fed, in order."""
    features, labels, weight, bias = make_data([5, 6, 7], 4, seed)
    kwargs = {"weight": weight, "bias": bias} if classifier else {}
    first, second = Measurement(3, 4, **kwargs), Measurement(3, 4, **kwargs)
    first.update(features[:9], labels[:9])
    second.update(features[9:], labels[9:])
    return first, second, features


def buffered(measurement: Measurement) -> list[torch.Tensor]:
    nc4 = measurement.state_dict()["nc4"]
    assert isinstance(nc4, dict)
    return nc4["features"]


# ------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("classifier", [True, False])
def test_merge_adds_the_samples_and_buffers(seed, classifier):
    """Merging two measurements of the same classifier (or of none) succeeds, adds the counts
    and the NC4 buffer, and forgets the last compute's statistics."""
    first, second, features = halves(seed, classifier)
    first.compute()
    assert first.merge(second) is first
    assert first.computed_stats is None
    assert first.stats.num_samples == len(features)
    assert torch.equal(first.stats.counts, torch.tensor([5, 6, 7]).to(first.stats.counts))
    if classifier:
        assert torch.equal(torch.cat(buffered(first)), features)
    else:
        assert first.state_dict()["nc4"] is None


@pytest.mark.parametrize("differs", ["weight", "bias"])
def test_merge_refuses_another_classifier(seed, differs):
    """A classifier that differs in its weight or only in its bias is refused before anything
    changes."""
    features, labels, weight, bias = make_data([5, 6, 7], 4, seed)
    other_weight = weight.clone()
    other_bias = bias.clone()
    if differs == "weight":
        other_weight[1, 2] += 1.0
    else:
        other_bias[2] += 1.0
    first = Measurement(3, 4, weight=weight, bias=bias)
    second = Measurement(3, 4, weight=other_weight, bias=other_bias)
    first.update(features[:9], labels[:9])
    second.update(features[9:], labels[9:])
    with pytest.raises(ValueError, match=MERGE + "the two measurements have different classifiers"):
        first.merge(second)
    assert first.stats.num_samples == 9
    assert len(buffered(first)) == 1


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_merge_compares_the_incoming_classifier_on_this_device(seed, part):
    """The incoming classifier is moved to this measurement's device before the comparison. A
    stand-in for a tensor on a second device (no box here has one) checks that: compared as is
    it is not a tensor; moved with ``.to(device)`` it is this measurement's own tensor."""
    first, second, _ = halves(seed, True)
    assert first.ncc is not None and second.ncc is not None
    own = getattr(first.ncc, part)
    moved_to: list[torch.device] = []

    class Elsewhere:
        shape = own.shape

        def to(self, device):
            moved_to.append(torch.device(device))
            return own.clone()

    setattr(second.ncc, part, Elsewhere())
    assert first.merge(second) is first
    assert moved_to == [own.device]


def test_merge_refuses_a_classifier_against_none(seed):
    with_one, _, _ = halves(seed, True)
    without, _, _ = halves(seed, False)
    for a, b in [(with_one, without), (without, with_one)]:
        with pytest.raises(ValueError, match=MERGE + "one measurement has a classifier and the"):
            a.merge(b)


# ------------------------------------------------------------------------------- reset
@pytest.mark.parametrize("classifier", [True, False])
def test_reset_forgets_samples_buffer_and_computed_stats(seed, classifier):
    first, _, _ = halves(seed, classifier)
    first.compute()
    first.reset()
    assert first.computed_stats is None
    assert first.stats.num_samples == 0
    if classifier:
        assert buffered(first) == []


# -------------------------------------------------------------------- state_dict / load
@pytest.mark.parametrize("classifier", [True, False])
def test_state_dict_round_trip(seed, classifier):
    """state_dict has exactly the keys ``stats`` and ``nc4`` (None without a classifier), and
    loading it into a fresh measurement restores the counts and the NC4 buffer."""
    first, _, features = halves(seed, classifier)
    state = first.state_dict()
    assert set(state) == {"stats", "nc4"}
    assert isinstance(state["stats"], dict)
    assert (state["nc4"] is None) is not classifier
    _, _, weight, bias = make_data([5, 6, 7], 4, seed)
    kwargs = {"weight": weight, "bias": bias} if classifier else {}
    restored = Measurement(3, 4, **kwargs)
    restored.update(features[9:], labels=torch.zeros(len(features) - 9, dtype=torch.int64))
    restored.compute(on_degenerate="nan")
    assert restored.load_state_dict(state) is restored
    assert restored.computed_stats is None
    assert torch.equal(restored.stats.counts, first.stats.counts)
    if classifier:
        assert len(buffered(restored)) == 1
        assert torch.equal(buffered(restored)[0], features[:9])


def test_load_names_what_is_missing_or_malformed(seed):
    first, _, _ = halves(seed, False)
    for state in [{}, [], {"nc4": None}]:
        with pytest.raises(InvalidStateError, match=LOAD + "state_dict lacks 'stats'$"):
            first.load_state_dict(state)
    malformed = "'stats' and 'nc4' must be the dicts that state_dict\\(\\) returned$"
    for state in [{"stats": 5, "nc4": None}, {"stats": 5}, {"stats": {}, "nc4": 5}]:
        with pytest.raises(InvalidStateError, match=LOAD + malformed):
            first.load_state_dict(state)
    assert first.stats.num_samples == 9


def test_load_names_the_classifier_mismatch(seed):
    with_one, _, _ = halves(seed, True)
    without, _, _ = halves(seed, False)
    with pytest.raises(
        InvalidStateError,
        match=LOAD + "this measurement has a classifier but the state holds no NC4 buffer$",
    ):
        with_one.load_state_dict(without.state_dict())
    with pytest.raises(
        InvalidStateError,
        match=LOAD + "this measurement has no classifier but the state holds an NC4 buffer$",
    ):
        without.load_state_dict(with_one.state_dict())


# ----------------------------------------------------------------------------- scalars
def test_scalars_default_prefix_and_prefix():
    assert scalars({"nc1": 0.5}) == {"nc1": 0.5}
    assert scalars({"nc1": 0.5}, "val/") == {"val/nc1": 0.5}


def test_scalars_skips_text_and_goes_on():
    metrics = {"nc_undefined": "a reason", "nc1": 0.5, "note": "x", "nc2": True}
    assert scalars(metrics) == {"nc1": 0.5, "nc2": 1.0}


def test_scalars_errors_name_scalars():
    with pytest.raises(TypeError, match=r"^scalars: metrics must be a dict, got list$"):
        scalars([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^scalars: metrics\['v'\] is a dict; only numbers"):
        scalars({"v": {}})


def test_scalars_of_integers_beyond_float64():
    """An integer past float64 becomes ±inf by its sign (alone or in a list)."""
    out = scalars({"big": 10**400, "small": -(10**400), "v": [10**400, -(10**400), 2]})
    assert out == {
        "big": math.inf,
        "small": -math.inf,
        "v/1": math.inf,
        "v/2": -math.inf,
        "v/3": 2.0,
    }


def test_scalars_of_tensors_numpy_arrays_and_lists():
    out = scalars(
        {
            "t0": torch.tensor(1.5, dtype=F64),
            "t1": torch.tensor([3.0, 1.0], dtype=torch.float32),
            "n1": np.array([2.5, 0.5]),
            "l": [1.0, None, 3],
            "tu": (4.0,),
        }
    )
    assert out.keys() == {"t0", "t1/1", "t1/2", "n1/1", "n1/2", "l/1", "l/2", "l/3", "tu/1"}
    assert out["t0"] == 1.5 and type(out["t0"]) is float
    assert [out["t1/1"], out["t1/2"], out["n1/1"], out["n1/2"]] == [3.0, 1.0, 2.5, 0.5]
    assert all(type(out[k]) is float for k in ("n1/1", "l/3"))
    assert out["l/1"] == 1.0 and math.isnan(out["l/2"]) and out["l/3"] == 3.0
    assert out["tu/1"] == 4.0


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (np.zeros((2, 2)), "ndarray"),
        (np.array(1.0), "ndarray"),
        (torch.zeros(2, 2), "Tensor"),
        (["a", 1.0], "list"),
    ],
)
def test_scalars_refuses_what_is_not_a_vector_of_numbers(value, kind):
    with pytest.raises(TypeError, match=rf"^scalars: metrics\['v'\] is a {kind}; only numbers"):
        scalars({"v": value})


def test_scalars_refuses_a_sequence_without_ndim():
    """Something with ``tolist`` but no ``ndim`` (an array.array) is not taken for a numpy
    array."""
    import array

    with pytest.raises(TypeError, match=r"^scalars: metrics\['v'\] is a array; only numbers"):
        scalars({"v": array.array("d", [1.0, 2.0])})


# ------------------------------------------------------------------------- construction
def test_constructor_defaults_and_smallest_sizes():
    """weight_decay defaults to 0; one class, one dim and a zero budget are allowed."""
    measurement = Measurement(1, 1, memory_budget_bytes=0)
    assert measurement.weight_decay == 0.0
    assert measurement.computed_stats is None
    assert measurement.weight is None and measurement.bias is None and measurement.ncc is None


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((0, 4), {}, ValueError, r"num_classes must be an integer ≥ 1"),
        ((2.5, 4), {}, TypeError, r"num_classes must be an integer"),
        ((3, 0), {}, ValueError, r"dim must be an integer ≥ 1"),
        ((3, 1.5), {}, TypeError, r"dim must be an integer"),
        ((3, 4), {"memory_budget_bytes": -1}, ValueError, r"memory_budget_bytes must be an integ"),
        ((3, 4), {"weight_decay": -1.0}, ValueError, r"weight_decay"),
        ((3, 4), {"weight": torch.zeros(3, 5, dtype=F64)}, ValueError, r"weight"),
        ((3, 4), {"weight": torch.zeros(2, 4, dtype=F64)}, ValueError, r"weight"),
    ],
)
def test_constructor_errors_name_measurement_and_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=r"^Measurement: " + message):
        Measurement(*args, **kwargs)


def test_constructor_passes_device_on_invalid_and_precision_on():
    measurement = Measurement(3, 4, device="meta", on_invalid="skip", precision="exact")
    assert measurement.stats.on_invalid == "skip"
    assert measurement.stats.precision == "exact"
    assert measurement.stats.state_dict()["counts"].device.type == "meta"


def test_invalid_rows_raise_with_the_measurement_advice(seed):
    features, labels, weight, bias = make_data([3, 3, 3], 4, seed)
    features[2, 1] = math.nan
    measurement = Measurement(3, 4, weight=weight, bias=bias)
    with pytest.raises(ValueError) as raised:
        measurement.update(features, labels)
    assert "pass Measurement(..., on_invalid='skip') to skip" in str(raised.value)
    assert "(see measurement.stats.skipped)" in str(raised.value)


# ------------------------------------------------------------------------------ update
def test_update_errors_name_the_call():
    with pytest.raises(ValueError, match=r"^Measurement\.update: features must have shape"):
        Measurement(3, 4).update(torch.zeros(2, 5, dtype=F64), torch.tensor([0, 1]))


def test_skipped_rows_are_left_out_of_the_nc4_buffer(seed):
    """With on_invalid='skip', a NaN row and an out-of-range label are marked invalid in the NC4
    buffer, as in the statistics."""
    features, labels, weight, bias = make_data([3, 3, 3], 4, seed)
    labels[4] = 7
    features[6, 0] = math.nan
    measurement = Measurement(3, 4, weight=weight, bias=bias, on_invalid="skip")
    measurement.update(features, labels)
    nc4 = measurement.state_dict()["nc4"]
    assert isinstance(nc4, dict)
    expected = torch.ones(9, dtype=torch.bool)
    expected[[4, 6]] = False
    assert torch.equal(nc4["valid"][0], expected)
    assert measurement.stats.num_samples == 7


# ----------------------------------------------------------------------------- compute
def ncc_mismatch_by_hand(features, labels, weight, bias, num_classes):
    """The NC4 fraction in float64: mismatches / N (the same division ncfast makes of the same
    counts; a sample within rounding of a tie between two means has probability ~0)."""
    means = torch.stack([features[labels == k].mean(0) for k in range(num_classes)])
    ncc = torch.cdist(features, means).argmin(1)
    return float((ncc != (features @ weight.T + bias).argmax(1)).double().mean())


def test_compute_is_nc_metrics_of_the_stats_and_the_mismatch(seed):
    """compute() is nc_metrics of its statistics, classifier (bias included), weight decay and
    the NC4 mismatch, which is the fraction of samples whose nearest class mean and classifier
    disagree; on_degenerate='nan' gives the same where the metrics are defined."""
    from ncfast.metrics import nc_metrics

    features, labels, weight, bias = make_data([6, 7, 8], 4, seed, spread=3.0)
    measurement = Measurement(3, 4, weight=weight, bias=bias, weight_decay=0.25)
    measurement.update(features, labels)
    got = measurement.compute()
    mismatch = ncc_mismatch_by_hand(features, labels, weight, bias, 3)
    assert got["nc4_ncc_mismatch"] == mismatch  # k / N both ways: exact
    expected = nc_metrics(measurement.stats, weight, bias, 0.25, ncc_mismatch=mismatch)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key
    again = measurement.compute(on_degenerate="nan")
    assert again.keys() == got.keys()
    assert again["nc4_ncc_mismatch"] == got["nc4_ncc_mismatch"]
    assert measurement.computed_stats is measurement.stats


def test_compute_with_a_second_pass(seed):
    """Past the budget, compute(second_pass=...) counts the batches again: the same mismatch."""
    features, labels, weight, bias = make_data([6, 7, 8], 4, seed, spread=3.0)
    measurement = Measurement(3, 4, weight=weight, bias=bias, memory_budget_bytes=0)
    measurement.update(features, labels)
    assert measurement.needs_second_pass
    got = measurement.compute(second_pass=[(features, labels)])
    mismatch = ncc_mismatch_by_hand(features, labels, weight, bias, 3)
    assert got["nc4_ncc_mismatch"] == mismatch  # k / N both ways: exact


def test_compute_degenerate_raises_or_gives_the_nan_row(seed):
    """One class seen: 'raise' raises, 'nan' gives nc_metrics_or_nan of the classifier."""
    from ncfast.metrics import nc_metrics_or_nan

    features, _, weight, bias = make_data([5, 6, 7], 4, seed)
    labels = torch.zeros(len(features), dtype=torch.int64)
    measurement = Measurement(3, 4, weight=weight, bias=bias, weight_decay=0.5)
    measurement.update(features, labels)
    with pytest.raises(ValueError, match=r"needs at least two classes with samples"):
        measurement.compute()
    got = measurement.compute(on_degenerate="nan")
    expected = nc_metrics_or_nan(measurement.stats, weight, bias, 0.5)
    assert got.keys() == expected.keys()
    assert str(got) == str(expected)


@pytest.mark.parametrize("bad", ["weight", "bias"])
def test_compute_nan_with_a_nan_classifier(seed, bad):
    """A NaN in the bias alone makes the metrics undefined, as one in the weight does."""
    features, labels, weight, bias = make_data([5, 6, 7], 4, seed)
    (weight if bad == "weight" else bias)[1] = math.nan
    measurement = Measurement(3, 4, weight=weight, bias=bias)
    measurement.update(features, labels)
    got = measurement.compute(on_degenerate="nan")
    assert isinstance(got["nc_undefined"], str)
    assert math.isnan(got["nc4_ncc_mismatch"])
    # Known undefined before NC4 counts: past the budget, no second pass is asked for.
    past_budget = Measurement(3, 4, weight=weight, bias=bias, memory_budget_bytes=0)
    past_budget.update(features, labels)
    assert str(past_budget.compute(on_degenerate="nan")) == str(got)


def test_compute_nan_where_the_means_do_not_separate():
    """Two classes seen with one and the same mean: nc_metrics raises, 'nan' gives the NaN row."""
    from ncfast.metrics import DegenerateFeaturesError

    measurement = Measurement(2, 2)
    measurement.update(torch.ones(4, 2, dtype=F64), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(DegenerateFeaturesError):
        measurement.compute()
    got = measurement.compute(on_degenerate="nan")
    assert isinstance(got["nc_undefined"], str)
    assert math.isnan(got["nc1"])


def test_distributed_compute_passes_the_group_on(seed, monkeypatch):
    """distributed=True reduces the statistics and all-reduces the NC4 counts over ``group``."""
    import torch.distributed as dist

    features, labels, weight, bias = make_data([6, 7, 8], 4, seed, spread=3.0)
    measurement = Measurement(3, 4, weight=weight, bias=bias)
    measurement.update(features, labels)
    group = object()
    seen = []
    monkeypatch.setattr(
        measurement.stats, "reduced", lambda g: seen.append(("reduced", g)) or measurement.stats
    )

    def all_reduce(tensor, group=None):
        seen.append(("all_reduce", group))
        assert isinstance(tensor, torch.Tensor) and tensor.shape == (2,)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    got = measurement.compute(distributed=True, group=group)
    assert seen == [("reduced", group), ("all_reduce", group)]
    mismatch = ncc_mismatch_by_hand(features, labels, weight, bias, 3)
    assert got["nc4_ncc_mismatch"] == mismatch  # k / N both ways: exact
