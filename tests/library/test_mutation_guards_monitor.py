"""Guards of ncfast/monitor.py that a mutant used to survive (issue 21): the constructor's
defaults and the settings it passes on (λ, the memory budget's bound, the precision checked at
construction, ``distributed=False``, ``on_degenerate``, the skip advice), the hooked place named
in every error, labels checked and flattened only where the classifier's input is the feature,
the error prefixes of ``evaluate``, a custom ``forward`` on the second pass, and
``watch_training(nc4=False)``. Numbers against tests/helpers/oracle.py in float64."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from ncfast.monitor import NCMonitor
from ncfast.stats import InvalidInputError
from tests.helpers import oracle
from tests.helpers.assertions import assert_matches_oracle
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import oracle_rtol

COUNTS = [14, 11, 9]  # three unbalanced classes
DIM = 4


def identity_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Sequential:
    """Features = the inputs themselves (float64), classifier = the given W and b."""
    classifier = nn.Linear(weight.shape[1], weight.shape[0]).to(F64)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return nn.Sequential(nn.Identity(), classifier)


def split(features: torch.Tensor, labels: torch.Tensor, size: int = 10) -> list:
    return list(zip(features.split(size), labels.split(size), strict=True))


def oracle_of(features, labels, weight, bias, lam=0.0) -> dict:
    return oracle.nc_metrics(
        features.numpy(), labels.numpy(), len(COUNTS), weight.numpy(), bias.numpy(), lam
    )


class Widening(nn.Module):
    """A classifier fed one value too many: the hook sees the mismatch before nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, 3).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([x, x[:, :1]], dim=1))


class KeywordCall(nn.Module):
    """Calls its classifier with ``input=`` (the forward pre-hook gets no positional args)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Tanh(), nn.Linear(DIM, 3).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=self.body(x))


def tanh_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, DIM), nn.Tanh(), nn.Linear(DIM, 3)).to(F64)


# --------------------------------------------------------------------- constructor settings
def test_the_default_weight_decay_is_zero_and_a_given_one_reaches_the_decomposition(seed):
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    rtol = oracle_rtol(features, labels, len(COUNTS), 0.25)
    default = NCMonitor(model, model[1]).evaluate(split(features, labels))
    assert default["weight_decay"] == 0.0
    assert_matches_oracle(default, oracle_of(features, labels, weight, bias, 0.0), rtol)
    given = NCMonitor(model, model[1], weight_decay=0.25).evaluate(split(features, labels))
    assert given["weight_decay"] == 0.25
    assert_matches_oracle(given, oracle_of(features, labels, weight, bias, 0.25), rtol)


def test_a_bad_weight_decay_is_an_error_of_the_monitor():
    model = tanh_net()
    with pytest.raises(ValueError, match=r"^NCMonitor: weight_decay \(λ of SPEC §3\) must be a"):
        NCMonitor(model, model[2], weight_decay=-1.0)


def test_a_memory_budget_of_zero_is_allowed_and_measures_nc4_on_a_second_pass(seed):
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    metrics = NCMonitor(model, model[1], memory_budget_bytes=0).evaluate(split(features, labels))
    expected = oracle_of(features, labels, weight, bias)
    assert metrics["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]  # a count: exact
    assert_matches_oracle(metrics, expected, oracle_rtol(features, labels, len(COUNTS)))
    with pytest.raises(ValueError, match="^NCMonitor: memory_budget_bytes must be an integer ≥ 0"):
        NCMonitor(model, model[1], memory_budget_bytes=-1)


def test_a_bad_precision_fails_at_construction_not_at_the_first_pass():
    model = tanh_net()
    with pytest.raises(ValueError, match="precision must be one of exact, fast, auto"):
        NCMonitor(model, model[2], precision="fastest")


def test_distributed_false_measures_without_a_process_group(seed):
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    monitor = NCMonitor(model, model[1], distributed=False)
    assert monitor.distributed is False
    metrics = monitor.evaluate(split(features, labels))
    assert metrics["num_samples"] == sum(COUNTS)


def test_a_fresh_monitor_has_no_last_pass_and_keeps_the_given_group():
    model = tanh_net()
    group = object()  # stands for a ProcessGroup: only handed on, never used without a pass
    monitor = NCMonitor(model, model[2], group=group)
    assert monitor.last_pass is None and monitor.open_pass is None
    assert monitor.group is group


def test_on_degenerate_nan_gives_a_row_of_nan_for_a_single_class():
    model = tanh_net()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    one_class = [(x, torch.zeros(8, dtype=torch.long))]
    metrics = NCMonitor(model, model[2], on_degenerate="nan").evaluate(one_class)
    assert "1 of 3 classes" in metrics["nc_undefined"] and math.isnan(metrics["nc1"])
    assert metrics["num_samples"] == 8


def test_invalid_features_are_an_error_with_the_monitors_skip_advice():
    model = tanh_net()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    x[2] = math.nan
    advice = (
        "pass NCMonitor(..., on_invalid='skip') to skip and count them "
        "(see monitor.last_pass.measurement.stats.skipped)"
    )
    with pytest.raises(InvalidInputError, match=re.escape(advice)):
        NCMonitor(model, model[2]).evaluate([(x, torch.arange(5) % 3)])


# ------------------------------------------------------------------ the hooked place named
def test_a_wrong_width_names_the_classifier_input_or_the_penultimate_module():
    y = torch.arange(5) % 3
    net = Widening()
    with pytest.raises(
        ValueError,
        match=r"^NCMonitor: the input of the classifier has 5 values per sample \(shape \[5, 5\]\)"
        " but the classifier takes 4",
    ):
        with torch.no_grad(), NCMonitor(net, net.fc).measure() as nc:
            nc.labels(y)
            net(torch.zeros(5, DIM, dtype=F64))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(DIM, 3)).to(F64)
    with pytest.raises(
        ValueError,
        match=r"^NCMonitor: the output of the penultimate module \(Tanh\) has 5 values per "
        r"sample \(shape \[5, 5\]\) but the classifier takes 4",
    ):
        with torch.no_grad(), NCMonitor(model, model[2], penultimate=model[1]).measure() as nc:
            nc.labels(y)
            model(torch.zeros(5, 6, dtype=F64))


def test_a_classifier_called_by_keyword_is_a_clear_error_not_an_index_error():
    net = KeywordCall()
    with pytest.raises(
        TypeError, match=r"^NCMonitor: the input of the classifier is a NoneType, not a tensor"
    ):
        with torch.no_grad(), NCMonitor(net, net.fc).measure() as nc:
            nc.labels(torch.arange(5) % 3)
            net(torch.zeros(5, DIM, dtype=F64))
    with torch.no_grad(), NCMonitor(net, net.fc, penultimate=net.body).measure() as nc:
        nc.labels(torch.arange(6) % 3)
        net(torch.randn(6, DIM, generator=torch.Generator().manual_seed(5), dtype=F64))
    assert nc.metrics["num_samples"] == 6  # hooked at the body's output, the keyword is fine


@pytest.mark.parametrize(
    ("penultimate", "place"), [(None, "input of the classifier Linear"), (1, "output of Tanh")]
)
def test_errors_of_the_pass_name_the_hooked_place(penultimate, place):
    model = tanh_net()
    monitor = NCMonitor(model, model[2], penultimate=None if penultimate is None else model[1])
    x, y = torch.zeros(4, 6, dtype=F64), torch.arange(4) % 3
    with pytest.raises(RuntimeError, match=re.escape(f"features reached the hook ({place})")):
        with torch.no_grad(), monitor.measure():
            model(x)
    with pytest.raises(
        ValueError, match=re.escape(f"(features [4, {DIM}] at the {place}); the labels must match")
    ):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(y[:3])
            model(x)


# ------------------------------------------------------------------------------- labels
def test_labels_are_flattened_only_when_the_classifier_input_is_the_feature(seed):
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    with torch.no_grad(), NCMonitor(model, model[1]).measure() as nc:
        nc.labels(labels[:, None])  # labels [N, 1] for inputs [N, P]: one label per row
        model(features)
    expected = oracle_of(features, labels, weight, bias)
    assert_matches_oracle(nc.metrics, expected, oracle_rtol(features, labels, len(COUNTS)))
    hooked = NCMonitor(model, model[1], penultimate=model[0])
    n = sum(COUNTS)
    with pytest.raises(ValueError, match=rf"labels of shape \[{n}, 1\] for a batch of {n} samples"):
        with torch.no_grad(), hooked.measure() as nc:
            nc.labels(labels[:, None])
            model(features)


@pytest.mark.parametrize("where", ["MonitorPass.labels", "TrainingWatch.labels"])
def test_float_labels_are_an_error_of_the_call_that_got_them(where):
    model = tanh_net()
    monitor = NCMonitor(model, model[2])
    message = f"^{re.escape(where)}: labels must be integer class indices, got torch.float64$"
    with pytest.raises(TypeError, match=message):
        if where == "MonitorPass.labels":
            with monitor.measure() as nc:
                nc.labels(torch.zeros(3, dtype=F64))
        else:
            with monitor.watch_training(every=1) as watch:
                watch.labels(torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_errors_name_evaluate():
    model = tanh_net()
    monitor = NCMonitor(model, model[2])
    x, y = torch.zeros(3, 6, dtype=F64), torch.arange(3)
    with pytest.raises(
        ValueError,
        match=r"^NCMonitor\.evaluate: each batch must be a \(inputs, labels\) pair, got tuple of "
        "length 3$",
    ):
        monitor.evaluate([(x, y, y)])
    with pytest.raises(
        TypeError, match=r"^NCMonitor\.evaluate: batches must be an iterable of \(inputs, labels\)"
    ):
        monitor.evaluate(3)


def test_a_custom_forward_also_runs_the_second_pass(seed):
    """Inputs the model cannot take directly (dicts): ``forward`` unpacks them on both passes."""
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    calls = []

    def forward(inputs: dict) -> torch.Tensor:
        calls.append(len(inputs["x"]))
        return model(inputs["x"])

    batches = [({"x": h}, y) for h, y in split(features, labels)]
    monitor = NCMonitor(model, model[1], memory_budget_bytes=0)
    metrics = monitor.evaluate(batches, forward=forward)
    assert calls == [len(h["x"]) for h, _ in batches] * 2  # the first pass and the second
    expected = oracle_of(features, labels, weight, bias)
    assert metrics["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert_matches_oracle(metrics, expected, oracle_rtol(features, labels, len(COUNTS)))


# ------------------------------------------------------------------------ watch_training
@pytest.mark.parametrize("nc4", [True, False])
def test_watch_training_passes_nc4_on(nc4, seed):
    """NC4 of a window is against the previous window's means: the second row has it unless
    ``nc4=False``."""
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias)
    rows = []
    with NCMonitor(model, model[1]).watch_training(every=1, nc4=nc4) as watch:
        for h, y in split(features, labels, 17):
            watch.labels(y)
            with torch.no_grad():
                model(h)
            rows.append(watch.step())
    assert [("nc4_ncc_mismatch" in row) for row in rows] == [False, nc4]


# --------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_moves_cpu_batches_to_the_classifiers_device(seed):
    features, labels, weight, bias = make_data(COUNTS, DIM, seed)
    model = identity_model(weight, bias).cuda()
    metrics = NCMonitor(model, model[1]).evaluate(split(features, labels))
    expected = oracle_of(features, labels, weight, bias)
    assert metrics["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]
    assert_matches_oracle(metrics, expected, oracle_rtol(features, labels, len(COUNTS)))
