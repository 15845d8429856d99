"""Guards of ncfast/monitor_pass.py that a mutant could survive (issue 21): the states of a pass
(new, open, done, failed) as :meth:`close` names them, ``cancel`` before opening and after
closing, ``needs_second_pass`` before the end, ``compute`` caching its result but not that of
``nc4=False``, the monitor's settings reaching the pass's measurement, the second pass (one
feature batch per forward, a single batch, errors naming ``compute``, the hook removed after an
error), the agreement of the ranks on a second pass and the process group handed on (with
torch.distributed faked in-process), and the classifier's fingerprint (no bias, in-place writes
of the same values, tiny ``.data`` edits, edits that float32 sums would lose, NaN weights)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ncfast import monitor_pass
from ncfast.measure import Measurement
from ncfast.monitor import NCMonitor
from tests.helpers.synthetic_features import F64, make_data

COUNTS = [7, 6, 5]  # three unbalanced classes
DIM = 4


def identity_model(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Sequential:
    """Features = the inputs themselves, classifier = the given W (and b; none if None)."""
    classifier = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    classifier = classifier.to(weight.dtype)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        if bias is not None:
            classifier.bias.copy_(bias)
    return nn.Sequential(nn.Identity(), classifier)


def data_and_model(seed: int, bias: bool = True):
    features, labels, weight, b = make_data(COUNTS, DIM, seed)
    return features, labels, identity_model(weight, b if bias else None)


def split(features: torch.Tensor, labels: torch.Tensor, size: int = 8) -> list:
    return list(zip(features.split(size), labels.split(size), strict=True))


def measured(monitor: NCMonitor, model: nn.Module, batches: list):
    """A closed pass of ``monitor`` over ``batches``."""
    with torch.no_grad(), monitor.measure() as nc:
        for x, y in batches:
            nc.labels(y)
            model(x)
    return nc


def over_budget_pass(seed: int):
    """(pass closed over budget, its batches, the model, the metrics of a buffered pass)."""
    features, labels, model = data_and_model(seed)
    batches = split(features, labels)
    expected = measured(NCMonitor(model, model[1]), model, batches).metrics
    nc = measured(NCMonitor(model, model[1], memory_budget_bytes=0), model, batches)
    assert nc.needs_second_pass
    return nc, batches, model, expected


# ------------------------------------------------------------------------------ states
def test_close_names_the_state_the_pass_is_in(seed):
    features, labels, model = data_and_model(seed)
    monitor = NCMonitor(model, model[1])
    fresh = monitor.measure()
    with pytest.raises(RuntimeError, match=r"the pass is not open \(it is new\)$"):
        fresh.close()
    done = measured(monitor, model, split(features, labels))
    assert done.batches == len(split(features, labels)) == 3
    with pytest.raises(RuntimeError, match=r"the pass is not open \(it is done\)$"):
        done.close()
    cancelled = monitor.measure().open()
    cancelled.cancel()
    with pytest.raises(RuntimeError, match=r"the pass is not open \(it is failed\)$"):
        cancelled.close()
    unused = monitor.measure().open()
    unused.labels(labels)
    with pytest.raises(ValueError, match="no forward pass of the model followed"):
        unused.close()
    with pytest.raises(RuntimeError, match=r"the pass is not open \(it is failed\)$"):
        unused.close()
    assert monitor.open_pass is None and not model[1]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="^MonitorPass.metrics: the measurement pass has not"):
        _ = unused.metrics
    with pytest.raises(RuntimeError, match="^MonitorPass.compute: the measurement pass has not"):
        unused.compute()


def test_cancel_before_opening_ends_the_pass_and_after_closing_keeps_it_done(seed):
    features, labels, model = data_and_model(seed)
    monitor = NCMonitor(model, model[1])
    never = monitor.measure()
    never.cancel()
    assert not never.is_open
    with pytest.raises(RuntimeError, match="can be opened once"):
        never.open()
    with pytest.raises(RuntimeError, match=r"^MonitorPass.metrics: the measurement pass has not"):
        _ = never.metrics
    done = measured(monitor, model, split(features, labels))
    metrics = done.metrics
    done.cancel()
    assert done.compute() is metrics  # still done: compute answers, with the same dict
    assert done.metrics is metrics
    with pytest.raises(RuntimeError, match=r"\(it is done\)$"):
        done.close()


def test_needs_second_pass_is_false_until_an_over_budget_pass_has_ended(seed):
    features, labels, model = data_and_model(seed)
    monitor = NCMonitor(model, model[1], memory_budget_bytes=0)
    nc = monitor.measure()
    assert nc.needs_second_pass is False
    nc.open()
    with torch.no_grad():
        nc.labels(labels)
        model(features)
    assert nc.needs_second_pass is False  # not before the pass has ended
    nc.close()
    assert nc.needs_second_pass is True
    fits = measured(NCMonitor(model, model[1]), model, split(features, labels))
    assert fits.needs_second_pass is False


# ---------------------------------------------------------------------------- compute
def test_compute_keeps_its_result_and_answers_again_without_a_second_pass(seed):
    nc, batches, _, expected = over_budget_pass(seed)
    with pytest.raises(ValueError, match="NC4 needs a second pass"):
        _ = nc.metrics
    metrics = nc.compute(second_pass=batches)
    assert metrics["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert nc.metrics is metrics
    assert nc.compute() is metrics  # cached: no second pass needed again


def test_compute_without_nc4_needs_no_second_pass_and_is_not_kept(seed):
    nc, batches, _, expected = over_budget_pass(seed)
    without = nc.compute(nc4=False)
    assert "nc4_ncc_mismatch" not in without
    assert without["num_samples"] == sum(COUNTS) and without["nc1"] == expected["nc1"]
    with pytest.raises(ValueError, match="NC4 needs a second pass"):
        _ = nc.metrics  # the metrics without NC4 are not the pass's metrics
    full = nc.compute(second_pass=batches)
    assert full["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert nc.metrics is full


def test_compute_without_nc4_leaves_it_out_of_metrics_computed_at_close(seed):
    """A pass within budget computes its metrics (with NC4) when it closes; compute(nc4=False)
    still returns them without ``nc4_ncc_mismatch``, as documented, and leaves them whole."""
    features, labels, model = data_and_model(seed)
    nc = measured(NCMonitor(model, model[1]), model, split(features, labels))
    metrics = nc.metrics
    without = nc.compute(nc4=False)
    assert "nc4_ncc_mismatch" not in without
    assert without == {k: v for k, v in metrics.items() if k != "nc4_ncc_mismatch"}
    assert "nc4_ncc_mismatch" in nc.metrics and nc.compute() is metrics


def test_a_close_that_fails_ends_the_pass_with_an_error_not_with_second_pass_advice(seed):
    """The classifier edited during the pass: close raises, and later reads of the pass say
    that it ended with an error (not that NC4 needs a second pass: it does not)."""
    features, labels, model = data_and_model(seed)
    nc = NCMonitor(model, model[1]).measure()
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with torch.no_grad(), nc:
            nc.labels(labels)
            model(features)
            model[1].weight.data[0, 0] += 1.0
    assert not nc.needs_second_pass
    with pytest.raises(RuntimeError, match=r"has not ended \(or ended with an error\)"):
        _ = nc.metrics
    with pytest.raises(RuntimeError, match=r"has not ended \(or ended with an error\)"):
        nc.compute()
    with pytest.raises(RuntimeError, match=r"\(it is failed\)$"):
        nc.close()


def test_second_pass_labels_are_checked_as_the_first_pass_labels(seed):
    """Labels of the second pass: float labels, and a count that does not match the batch,
    are errors naming compute(second_pass), as in the first pass (not NC4's errors later)."""
    nc, batches, _, _ = over_budget_pass(seed)
    (x, y), *rest = batches
    with pytest.raises(TypeError, match=r"^MonitorPass\.compute\(second_pass\): labels must"):
        nc.compute(second_pass=[(x, y.double()), *rest])
    with pytest.raises(
        ValueError, match=r"^MonitorPass\.compute\(second_pass\): got labels of shape \[7\]"
    ):
        nc.compute(second_pass=[(x, y[:7]), *rest])
    assert nc.needs_second_pass  # nothing was kept: the right batches still work


def test_the_pass_measures_with_the_monitors_settings(seed):
    """What open() hands to its Measurement: the classifier (weight and bias), λ, the device
    (before any batch), on_invalid and precision."""
    features, labels, model = data_and_model(seed)
    fc = model[1]
    monitor = NCMonitor(model, fc, weight_decay=0.5, on_invalid="skip", precision="exact")
    nc = monitor.measure().open()
    measurement = nc.measurement
    assert measurement is not None
    assert torch.equal(measurement.weight, fc.weight.detach())
    assert torch.equal(measurement.bias, fc.bias.detach())
    assert measurement.weight_decay == 0.5
    assert measurement.stats.device == fc.weight.device  # allocated at open, not at a batch
    assert measurement.stats.on_invalid == "skip" and measurement.stats.precision == "exact"
    features = features.clone()
    features[0] = math.nan
    with torch.no_grad():
        nc.labels(labels)
        model(features)
    nc.close()
    assert nc.batches == 1
    assert nc.metrics["num_samples"] == sum(COUNTS) - 1  # the NaN row skipped


# ------------------------------------------------------------------------- second pass
class Twice(nn.Module):
    """Runs its classifier twice per forward (for the second pass's one-batch check)."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.fc(x)


def test_the_second_pass_needs_exactly_one_feature_batch_per_forward(seed):
    nc, batches, model, _ = over_budget_pass(seed)
    twice = Twice(model[1])
    with pytest.raises(RuntimeError, match="second pass hooked 2 feature batches for one forward"):
        nc.compute(second_pass=batches, forward=twice)
    assert not model[1]._forward_pre_hooks  # removed on the error too
    with pytest.raises(RuntimeError, match="second pass hooked 0 feature batches for one forward"):
        nc.compute(second_pass=batches, forward=model[0])  # never reaches the classifier
    assert not model[1]._forward_pre_hooks
    assert nc.compute(second_pass=batches)["num_samples"] == sum(COUNTS)  # still computable


def test_a_second_pass_of_one_batch_with_list_labels_is_enough(seed):
    features, labels, model = data_and_model(seed)
    expected = measured(NCMonitor(model, model[1]), model, [(features, labels)]).metrics
    monitor = NCMonitor(model, model[1], memory_budget_bytes=0)
    nc = measured(monitor, model, [(features, labels)])
    assert nc.needs_second_pass
    metrics = nc.compute(second_pass=[(features, labels.tolist())])
    assert metrics["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert metrics["num_samples"] == sum(COUNTS)


def test_second_pass_errors_name_compute_and_leave_no_hook(seed):
    nc, batches, model, _ = over_budget_pass(seed)
    with pytest.raises(
        TypeError,
        match=r"^MonitorPass\.compute\(second_pass\): batches must be an iterable of \(inputs, "
        "labels\\), got int$",
    ):
        nc.compute(second_pass=3)
    with pytest.raises(
        ValueError, match=r"^MonitorPass\.compute\(second_pass\): each batch must be a \(inputs"
    ):
        nc.compute(second_pass=[(batches[0][0],)])
    assert not model[1]._forward_pre_hooks
    with pytest.raises(ValueError, match="^NCMonitor: the second pass yielded no batches"):
        nc.compute(second_pass=[])
    assert not model[1]._forward_pre_hooks


def test_a_label_count_mismatch_is_an_error_of_labels(seed):
    features, labels, model = data_and_model(seed)
    with pytest.raises(
        ValueError, match=r"^MonitorPass\.labels: got labels of shape \[3\] for a batch of 4 "
    ):
        with torch.no_grad(), NCMonitor(model, model[1]).measure() as nc:
            nc.labels(labels[:3])
            model(features[:4])


# ------------------------------------------------------------------------- distributed
class FakeAllReduce:
    """Stands for torch.distributed.all_reduce: records its calls and sets the flag to what
    the other ranks would give (``other_rank_needs``: another rank's features were over
    budget)."""

    def __init__(self, other_rank_needs: bool) -> None:
        self.other_rank_needs = other_rank_needs
        self.calls: list[dict] = []

    def __call__(self, tensor: torch.Tensor, op=None, group=None) -> None:
        self.calls.append({"op": op, "group": group})
        if self.other_rank_needs:
            tensor.fill_(1)


@pytest.mark.parametrize("other_rank_needs", [False, True])
def test_the_ranks_agree_on_a_second_pass_and_the_group_is_handed_on(
    other_rank_needs, monkeypatch, seed
):
    """In distributed mode a pass that fits here still needs a second pass when another rank's
    did not fit; the all-reduce and the measurement's compute get the monitor's group."""
    features, labels, model = data_and_model(seed)
    group = object()  # stands for a ProcessGroup: only handed on
    fake = FakeAllReduce(other_rank_needs)
    computed: list[dict] = []

    def fake_compute(self, **kwargs):
        computed.append(kwargs)
        return {"num_samples": -1}

    monkeypatch.setattr(monitor_pass, "distributed_now", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake)
    monkeypatch.setattr(Measurement, "compute", fake_compute)
    monitor = NCMonitor(model, model[1], distributed=True, group=group, on_degenerate="nan")
    nc = measured(monitor, model, split(features, labels))
    assert fake.calls == [{"op": torch.distributed.ReduceOp.MAX, "group": group}]
    assert nc.needs_second_pass is other_rank_needs
    if other_rank_needs:
        assert computed == []
        nc.compute(second_pass=split(features, labels))
    (kwargs,) = computed
    assert kwargs["distributed"] is True and kwargs["group"] is group
    assert kwargs["on_degenerate"] == "nan" and kwargs["nc4"] is True
    assert (kwargs["second_pass"] is not None) is other_rank_needs
    assert nc.metrics == {"num_samples": -1}


def test_distributed_false_measures_locally_even_under_a_process_group(monkeypatch, seed):
    features, labels, model = data_and_model(seed)
    fake = FakeAllReduce(other_rank_needs=True)
    monkeypatch.setattr(monitor_pass, "distributed_now", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake)
    nc = measured(NCMonitor(model, model[1], distributed=False), model, split(features, labels))
    assert fake.calls == [] and nc.needs_second_pass is False
    assert nc.metrics["num_samples"] == sum(COUNTS)


# ------------------------------------------------------------------------- fingerprint
def test_a_classifier_without_bias_is_measured_and_a_data_edit_of_it_is_seen(seed):
    features, labels, model = data_and_model(seed, bias=False)
    monitor = NCMonitor(model, model[1])
    assert measured(monitor, model, split(features, labels)).metrics["num_samples"] == sum(COUNTS)
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(labels)
            model(features)
            model[1].weight.data[1, 2] += 0.5


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_an_in_place_write_of_the_same_values_is_a_change(part, seed):
    """The in-place counters: a write counts even when it leaves every value as it was."""
    features, labels, model = data_and_model(seed)
    tensor = getattr(model[1], part)
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with torch.no_grad(), NCMonitor(model, model[1]).measure() as nc:
            nc.labels(labels)
            model(features)
            tensor.copy_(tensor.clone())


@pytest.mark.parametrize(("part", "index"), [("weight", (2, 3)), ("bias", (1,))])
def test_a_data_edit_of_one_part_in_ten_billion_is_seen(part, index, seed):
    """The digest compares exactly (no relative or absolute tolerance)."""
    features, labels, _ = data_and_model(seed)
    weight = torch.linspace(0.5, 2.0, 3 * DIM, dtype=F64).reshape(3, DIM)
    model = identity_model(weight, torch.tensor([0.5, 1.0, 1.5], dtype=F64))
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with torch.no_grad(), NCMonitor(model, model[1]).measure() as nc:
            nc.labels(labels)
            model(features)
            getattr(model[1], part).data[index] += 1e-10


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_a_float32_data_edit_that_float32_sums_lose_is_seen(part):
    """+1 next to 2^24 is lost in float32 sums (the sum, the sum of squares and the row-weighted
    sum all stay the same: the edit is in a row of 2^24, or in row 0) but not in the float64
    digest."""
    big = 2.0**24
    weight = torch.zeros(3, DIM)
    bias = torch.zeros(3)
    if part == "weight":
        weight[0, 0], edited = big, (0, 1)
    else:
        bias[1], edited = big, (0,)  # row 0: no weight in the row-weighted sum
    model = identity_model(weight, bias)
    x = torch.eye(DIM)[:3]
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with torch.no_grad(), NCMonitor(model, model[1], on_degenerate="nan").measure() as nc:
            nc.labels(torch.arange(3))
            model(x)
            getattr(model[1], part).data[edited] = 1.0
    with torch.no_grad(), NCMonitor(model, model[1], on_degenerate="nan").measure() as nc:
        nc.labels(torch.arange(3))
        model(x)
    assert nc.metrics["num_samples"] == 3  # unedited: measured


def test_nan_weights_compare_equal_to_themselves():
    """A diverged classifier is measured (a row of NaN with the reason), not called changed."""
    features, labels, _ = data_and_model(0)
    weight = torch.linspace(0.5, 2.0, 3 * DIM, dtype=F64).reshape(3, DIM)
    weight[1, 1] = math.nan
    model = identity_model(weight, torch.zeros(3, dtype=F64))
    metrics = NCMonitor(model, model[1], on_degenerate="nan").evaluate(split(features, labels))
    assert "not finite" in metrics["nc_undefined"] and math.isnan(metrics["nc1"])


def test_no_fingerprint_before_is_never_the_same():
    """Unreachable through the public surface (open() always takes one): a pass without a
    fingerprint must count as changed, not as unchanged."""
    weight = torch.ones(3, DIM)
    now = monitor_pass._fingerprint(weight, None)
    assert monitor_pass._same_fingerprint(now, now) is True
    assert monitor_pass._same_fingerprint(now, None) is False
