"""Guards of ncfast.integrations.torchmetrics.NeuralCollapse that small mutants of the module
used to survive: the registered states (names, dtypes, defaults) and their round trip through
state_dict, the checks of load_state_dict and merge_state naming the bad key, reset to an empty
metric, forward, a merge of unbalanced parts with a missing class against the brute force, the
classifier forms (a layer without bias, float32 tensors, a list pair, bad pairs), on_invalid and
on_degenerate, and the NC4 flag. Values are checked against tests/helpers/oracle.py. Tiny CPU
data: the whole file runs in a few seconds."""

from __future__ import annotations

import inspect
import io
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ncfast
from ncfast.stats import InvalidStateError
from tests.helpers import oracle
from tests.helpers.assertions import assert_matches_oracle
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import oracle_rtol
from tests.helpers.warning_origin import assert_warned_from

pytest.importorskip("torchmetrics")
from ncfast.integrations.torchmetrics import NeuralCollapse

C, P = 4, 3
COUNTS = [6, 5, 0, 4]  # unbalanced, class 2 never seen
STATE_SHAPES = {
    "counts": ((C,), torch.int64),
    "shift": ((C, P), F64),
    "sums": ((C, P), F64),
    "scatter": ((P, P), F64),
    "invalid": ((2,), torch.int64),
}
NC4_STATES = ("nc4_features", "nc4_valid", "nc4_counts")


def data(seed):
    return make_data(COUNTS, P, seed)


def expected_of(features, labels, weight=None, bias=None, lam=0.0) -> dict:
    """The brute force's metrics of ``features`` (float64 numpy, tests/helpers/oracle.py)."""
    to_np = lambda t: None if t is None else t.to(F64).numpy()  # noqa: E731
    return oracle.nc_metrics(features.numpy(), labels.numpy(), C, to_np(weight), to_np(bias), lam)


def assert_oracle(result: dict, features, labels, weight=None, bias=None, lam=0.0, nc4=True):
    """Every key of the brute force within its bound N·eps·κ (:func:`oracle_rtol`; the NC4
    fraction is a count: exact up to DIMENSIONLESS_ATOL); no classifier keys without one, no
    NC4 without ``nc4``."""
    expected = expected_of(features, labels, weight, bias, lam)
    if not nc4:
        del expected["nc4_ncc_mismatch"]
    assert_matches_oracle(result, expected, oracle_rtol(features, labels, C, lam))
    assert ("nc4_ncc_mismatch" in result) == (weight is not None and nc4)
    assert ("loss_mse" in result) == (weight is not None)


def fed(metric: NeuralCollapse, features, labels, batch: int = 4) -> NeuralCollapse:
    for start in range(0, len(labels), batch):
        metric.update(features[start : start + batch], labels[start : start + batch])
    return metric


def state_of(metric: NeuralCollapse) -> dict:
    return {k: getattr(metric, k) for k in metric._defaults}


def assert_empty(metric: NeuralCollapse, nc4: bool):
    """The states of a metric that has seen nothing, with their names, shapes and dtypes."""
    assert set(metric._defaults) == set(STATE_SHAPES) | (set(NC4_STATES) if nc4 else set())
    for name, (shape, dtype) in STATE_SHAPES.items():
        value = getattr(metric, name)
        assert tuple(value.shape) == shape and value.dtype == dtype, name
        assert not value.any(), name
    if nc4:
        assert metric.nc4_features == [] and metric.nc4_valid == []
        # [dropped 0/1, mismatches, valid samples]: -1 until a sync fills them.
        assert metric.nc4_counts.tolist() == [0, -1, -1]
        assert metric._nc4_dropped is False


# --------------------------------------------------------------------- __init__ and states
@pytest.mark.parametrize("nc4", [True, False])
def test_states_start_empty_and_reset_empties_them(seed, nc4):
    features, labels, weight, bias = data(seed)
    metric = NeuralCollapse(C, P, (weight, bias), nc4=nc4, memory_budget_bytes=5 * P * 8)
    assert metric.nc4 is nc4
    assert_empty(metric, nc4)
    fed(metric, features, labels)  # 15 samples past a 5-sample budget: the buffer is dropped
    if nc4:
        assert metric.nc4_counts.tolist() == [1, -1, -1] and metric._nc4_dropped is True
    metric.reset()
    assert_empty(metric, nc4)
    # An empty metric: NaN in "nan" mode, saying why; a ValueError otherwise.
    with pytest.warns(UserWarning, match="called before the ``update``"):
        row = NeuralCollapse(C, P, (weight, bias), nc4=nc4, on_degenerate="nan").compute()
    assert isinstance(row["nc_undefined"], str) and "0 of 4 classes" in row["nc_undefined"]
    assert math.isnan(row["nc1"]) and int(row["num_samples"]) == 0
    # (a NaN row has every key of a classifier, NC4's too, whatever ``nc4`` says)
    with pytest.warns(UserWarning, match="before the ``update``"):
        with pytest.raises(ValueError, match="needs at least two classes with samples"):
            metric.compute()
    # After the reset, a pass within the budget measures NC4 again (no stale flag).
    metric.memory_budget_bytes = 10**6
    result = fed(metric, features, labels).compute()
    assert_oracle(result, features, labels, weight, bias, nc4=nc4)


def test_constructor_bounds_and_on_degenerate(seed):
    NeuralCollapse(1, 1)  # the least class count and dim
    with pytest.raises(ValueError, match="^NeuralCollapse: dim must be an integer ≥ 1"):
        NeuralCollapse(2, 0)
    with pytest.raises(ValueError, match="^NeuralCollapse: num_classes must be an integer ≥ 1"):
        NeuralCollapse(0, 2)
    with pytest.raises(ValueError, match="^NeuralCollapse: memory_budget_bytes must be .* ≥ 0"):
        NeuralCollapse(2, 2, memory_budget_bytes=-1)
    with pytest.raises(ValueError, match=r"^NeuralCollapse: weight_decay \(λ of SPEC §3\) must be"):
        NeuralCollapse(2, 2, weight_decay=-0.5)
    with pytest.raises(ValueError, match="on_degenerate must be one of"):
        NeuralCollapse(2, 2, on_degenerate="ignore")
    # A budget of 0 bytes is allowed: nothing is buffered and NC4 is NaN with the warning.
    features, labels, weight, bias = data(seed)
    zero = fed(NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=0), features, labels)
    with pytest.warns(RuntimeWarning, match="exceeded memory_budget_bytes=0"):
        assert math.isnan(zero.compute()["nc4_ncc_mismatch"])
    # One sample: degenerate. "nan" mode gives NaN (NC4 of that one sample is counted first,
    # so it must not fail), the default raises.
    one = NeuralCollapse(C, P, (weight, bias), on_degenerate="nan")
    one.update(features[:1], labels[:1])
    row = one.compute()
    assert math.isnan(row["nc1"]) and "1 of 4 classes" in row["nc_undefined"]
    assert all(v.dtype == F64 for k, v in row.items() if k != "nc_undefined")
    strict = NeuralCollapse(C, P, (weight, bias))
    strict.update(features[:1], labels[:1])
    with pytest.raises(ValueError, match="needs at least two classes with samples; 1 of 4"):
        strict.compute()


# ------------------------------------------------------------------ update and forward
def test_forward_updates_and_accumulates_with_weight_decay(seed):
    features, labels, weight, bias = data(seed)
    metric = NeuralCollapse(C, P, nn_linear(weight, bias), weight_decay=0.3)
    assert metric(features[:5], labels[:5]) is None
    metric.update(features[:0], labels[:0])  # an empty batch changes nothing, drops nothing
    assert metric(features[5:], labels[5:]) is None
    result = metric.compute()
    assert float(result["weight_decay"]) == 0.3
    assert_oracle(result, features, labels, weight, bias, lam=0.3)


def test_on_invalid_skip_counts_and_leaves_out_bad_rows(seed):
    features, labels, weight, bias = data(seed)
    bad_features, bad_labels = features.clone(), labels.clone()
    bad_features[0, 1] = math.nan
    bad_labels[1] = C
    metric = fed(NeuralCollapse(C, P, (weight, bias), on_invalid="skip"), bad_features, bad_labels)
    assert metric.invalid.tolist() == [1, 1]  # [labels out of range, non-finite features]
    assert_oracle(metric.compute(), features[2:], labels[2:], weight, bias)
    strict = NeuralCollapse(C, P, (weight, bias))
    advice = r"pass NeuralCollapse\(\.\.\., on_invalid='skip'\) .* the metric's `invalid` state"
    with pytest.raises(ncfast.InvalidInputError, match=advice):
        strict.update(bad_features, labels)
    with pytest.raises(ValueError, match=r"NeuralCollapse\.update: .*shape \[B, 3\]"):
        strict.update(features[:, :2], labels)


# ------------------------------------------------------------------------ the classifier
def nn_linear(weight, bias, dtype=F64) -> nn.Linear:
    layer = nn.Linear(P, C, bias=bias is not None).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_classifier_forms_are_read_in_float64(seed):
    """A layer without bias (zero bias), float32 tensors and layers (read as their exact
    float64 values), a list pair; tensors are copied, not referenced, and not saved."""
    features, labels, weight, bias = data(seed)
    w32, b32 = weight.float(), bias.float()
    forms = [
        (nn_linear(weight, None), weight, None),
        (nn_linear(w32, b32, torch.float32), w32, b32),
        ((w32, b32), w32, b32),
        ([weight, bias], weight, bias),
    ]
    for classifier, want_weight, want_bias in forms:
        metric = fed(NeuralCollapse(C, P, classifier), features, labels)
        assert metric.has_classifier
        assert_oracle(metric.compute(), features, labels, want_weight, want_bias)
    pair = NeuralCollapse(C, P, (weight.clone(), bias.clone()))
    pair.persistent(True)
    assert not {"classifier_weight", "classifier_bias"} & set(pair.state_dict())
    copied_weight = weight.clone()
    copied = NeuralCollapse(C, P, (copied_weight, None))
    copied_weight.mul_(3)  # the metric holds its own copy
    assert torch.equal(copied.classifier_weight, weight) and copied.classifier_bias is None
    assert not NeuralCollapse(C, P).has_classifier


def test_bad_classifier_pairs_are_refused(seed):
    _, _, weight, bias = data(seed)
    with pytest.raises(TypeError, match="classifier must be None, an nn.Linear"):
        NeuralCollapse(C, P, (weight, bias, bias))
    with pytest.raises(ValueError, match=r"classifier weight must have shape .* \[4, 3\]"):
        NeuralCollapse(C, P, (weight.tolist(), bias))
    with pytest.raises(ValueError, match=r"classifier bias must have shape \[4\]"):
        NeuralCollapse(C, P, (weight, torch.zeros(C + 1, dtype=F64)))
    with pytest.raises(ValueError, match=r"classifier bias must have shape \[4\]"):
        NeuralCollapse(C, P, (weight, bias.tolist()))


# -------------------------------------------------------------------- state_dict round trip
def test_state_dict_round_trip_and_load_checks(seed):
    features, labels, weight, bias = data(seed)
    saved = fed(NeuralCollapse(C, P, (weight, bias), weight_decay=0.1), features, labels)
    saved.persistent(True)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(state) == set(STATE_SHAPES) | set(NC4_STATES)
    loaded = NeuralCollapse(C, P, (weight, bias), weight_decay=0.1)
    loaded.load_state_dict(state)
    assert_oracle(loaded.compute(), features, labels, weight, bias, lam=0.1)

    fresh = NeuralCollapse(C, P, (weight, bias))
    where = "NeuralCollapse.load_state_dict"
    bad_shape = {**state, "scatter": torch.zeros(P + 1, P + 1, dtype=F64)}
    with pytest.raises(InvalidStateError, match=f"{where}: the state's tensors have shapes"):
        fresh.load_state_dict(bad_shape)
    assert_empty(fresh, nc4=True)  # checked before any state is set
    partial = {k: v for k, v in state.items() if k != "scatter"}
    with pytest.raises(InvalidStateError, match=rf"{where}: the state lacks \['scatter'\]"):
        fresh.load_state_dict(partial)
    with pytest.raises(InvalidStateError, match=f"{where}: 'nc4_counts' must be a tensor of 3"):
        fresh.load_state_dict({**state, "nc4_counts": torch.zeros(2, dtype=torch.int64)})
    no_nc4 = {k: v for k, v in state.items() if k not in NC4_STATES}
    lacks = rf"{where}: this metric measures NC4 .* lacks \['nc4_features', 'nc4_valid', "
    with pytest.raises(InvalidStateError, match=lacks):
        fresh.load_state_dict(no_nc4)
    assert_empty(fresh, nc4=True)
    # A metric without NC4 loads the statistics alone; an unknown key is still reported.
    lean = NeuralCollapse(C, P, (weight, bias), weight_decay=0.1, nc4=False)
    lean.load_state_dict(no_nc4)
    row = lean.compute()
    assert "nc4_ncc_mismatch" not in row and float(row["loss_mse"]) == float(
        loaded.compute()["loss_mse"]
    )
    with pytest.raises(RuntimeError, match="Unexpected key"):
        lean.load_state_dict({**no_nc4, "stray": torch.zeros(1)})


# ---------------------------------------------------------------------------- merge_state
def test_merge_of_unbalanced_parts_equals_the_brute_force(seed):
    """Two parts (class 3 only in the second), merged: every metric of all samples, NC4 from
    the merged buffer; two metrics without NC4 merge their statistics alone."""
    features, labels, weight, bias = data(seed)
    first = labels != 3
    parts = [(features[first], labels[first]), (features[~first], labels[~first])]
    for nc4 in (True, False):
        mine, theirs = (
            fed(NeuralCollapse(C, P, (weight, bias), weight_decay=0.2, nc4=nc4), *part)
            for part in parts
        )
        mine.merge_state(theirs)
        if nc4:
            assert sum(len(f) for f in mine.nc4_features) == len(labels)
        assert_oracle(mine.compute(), features, labels, weight, bias, lam=0.2, nc4=nc4)


def test_merge_state_checks_the_incoming_state_and_names_the_bad_key(seed):
    features, labels, weight, bias = data(seed)
    metric = fed(NeuralCollapse(C, P, (weight, bias)), features, labels)
    before = {
        k: (list(v) if isinstance(v, list) else v.clone()) for k, v in state_of(metric).items()
    }
    good = state_of(fed(NeuralCollapse(C, P, (weight, bias)), features, labels))
    where = "NeuralCollapse.merge_state"
    bad = {
        f"{where}: the state's tensors have shapes": {**good, "sums": torch.zeros(C, P + 1)},
        rf"{where}: the NC4 features must be \[B, 3\]": {
            **good,
            "nc4_features": [torch.zeros(2, P + 1, dtype=F64)],
            "nc4_valid": [torch.ones(2, dtype=torch.bool)],
        },
        f"{where}: 'nc4_counts' must be a tensor of 3 counts": {
            **good,
            "nc4_counts": torch.zeros(2, dtype=torch.int64),
        },
        f"{where}: 'nc4_counts' must be a tensor of 3": {**good, "nc4_counts": [0, -1, -1]},
        rf"{where}: this metric measures NC4 .* lacks \['nc4_counts'\]": {
            k: v for k, v in good.items() if k != "nc4_counts"
        },
    }
    for message, state in bad.items():
        with pytest.raises(InvalidStateError, match=message):
            metric.merge_state(state)
    lean = fed(NeuralCollapse(C, P, (weight, bias), nc4=False), features, labels)
    with pytest.raises(InvalidStateError, match=rf"{where}: this metric measures NC4"):
        metric.merge_state(lean)
    for key, value in state_of(metric).items():  # unchanged by the refused merges
        if isinstance(value, list):
            assert len(value) == len(before[key])
        else:
            assert torch.equal(value, before[key]), key


def test_a_loaded_dropped_buffer_stays_dropped_through_a_merge(seed):
    """A state saved past the budget carries the flag in nc4_counts[0]: merged with a metric
    within its budget, NC4 is NaN with the warning and nothing more is buffered."""
    features, labels, weight, bias = data(seed)
    dropped = fed(NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=8), features, labels)
    dropped.persistent(True)
    restored = NeuralCollapse(C, P, (weight, bias))
    restored.load_state_dict(dropped.state_dict())
    restored.merge_state(fed(NeuralCollapse(C, P, (weight, bias)), features, labels))
    assert restored.nc4_features == [] and restored._nc4_dropped is True
    with pytest.warns(RuntimeWarning, match="exceeded memory_budget_bytes"):
        assert math.isnan(restored.compute()["nc4_ncc_mismatch"])


def test_a_loaded_dropped_buffer_buffers_nothing_more(seed):
    """Restored past its budget (saved by a metric of a small budget), a metric of a large
    budget buffers no later features (NC4 is NaN anyway); a restored buffer within the budget
    goes on buffering (all 15 features)."""
    features, labels, weight, bias = data(seed)
    for saved_budget, kept in ((8, 0), (2**20, len(labels))):
        saved = NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=saved_budget)
        fed(saved, features[:6], labels[:6])
        saved.persistent(True)
        restored = NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=2**20)
        restored.load_state_dict(saved.state_dict())
        fed(restored, features[6:], labels[6:])
        assert sum(len(f) for f in restored.nc4_features) == kept, saved_budget


def test_the_over_budget_warning_points_at_the_callers_line(seed):
    """The NaN-NC4 warning names the budget and what to do, and points at the line that called
    ``compute()`` (not at ncfast or torchmetrics' compute wrapper), so a warnings filter on the
    user's module catches it."""
    features, labels, weight, bias = data(seed)
    metric = fed(NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=8), features, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        result = metric.compute()
    assert math.isnan(result["nc4_ncc_mismatch"])
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert str(warning.message) == (
        "NeuralCollapse: the features of this pass exceeded memory_budget_bytes=8, so "
        "nc4_ncc_mismatch is NaN; raise the budget or pass nc4=False"
    )
    assert_warned_from(warning, __file__, line)


def test_a_restored_buffer_is_held_to_the_new_budget(seed):
    """A buffer saved within a large budget (15 samples, 360 bytes) and restored into a metric
    of a smaller budget is dropped (NC4 NaN with the warning, nothing buffered later); within
    the new budget it is kept and NC4 is that of all samples. The loaded lists stay the
    caller's: later updates do not grow the saved metric's buffer."""
    features, labels, weight, bias = data(seed)
    saved = fed(NeuralCollapse(C, P, (weight, bias)), features, labels)
    saved.persistent(True)
    size = len(labels) * P * 8
    for budget in (size - 1, size, size + 8 * P):
        restored = NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=budget)
        restored.load_state_dict(saved.state_dict())
        if budget < size:
            assert restored.nc4_features == [] and restored._nc4_dropped is True
            assert restored.nc4_counts.tolist() == [1, -1, -1]
            fed(restored, features[:1], labels[:1])
            assert restored.nc4_features == []
            with pytest.warns(RuntimeWarning, match=f"memory_budget_bytes={budget}"):
                assert math.isnan(restored.compute()["nc4_ncc_mismatch"])
            continue
        assert sum(len(f) for f in restored.nc4_features) == len(labels)
        assert restored._nc4_dropped is False and restored.nc4_counts.tolist() == [0, -1, -1]
        assert_oracle(restored.compute(), features, labels, weight, bias)
        fed(restored, features[:1], labels[:1])  # one more sample: fits only the largest
        kept = sum(len(f) for f in restored.nc4_features)
        assert kept == (len(labels) + 1 if budget > size else 0)
        assert sum(len(f) for f in saved.nc4_features) == len(labels)


def test_a_metric_without_nc4_ignores_a_saved_nc4_buffer(seed):
    """A state saved by a metric with NC4, loaded (strict=False) by one with nc4=False: the
    statistics are restored, the NC4 entries are reported unexpected and not kept."""
    features, labels, weight, bias = data(seed)
    saved = fed(NeuralCollapse(C, P, (weight, bias)), features, labels)
    saved.persistent(True)
    lean = NeuralCollapse(C, P, (weight, bias), nc4=False)
    report = lean.load_state_dict(saved.state_dict(), strict=False)
    assert sorted(report.unexpected_keys) == sorted(NC4_STATES)
    assert not hasattr(lean, "nc4_counts") and lean._nc4_dropped is False
    assert_oracle(lean.compute(), features, labels, weight, bias, nc4=False)


# ------------------------------------------------------------------ sync across two ranks
def _sync_with_an_idle_rank(rank, world, port, features, labels, weight, bias, out_dir):
    with gloo_group(rank, world, port):
        # Rank 1 sees no sample at all (one empty batch): it adds nothing, NC4 included.
        idle = NeuralCollapse(C, P, (weight, bias))
        if rank == 0:
            fed(idle, features, labels)
        else:
            idle.update(features[:0], labels[:0])
        alone = idle.compute()
        # Rank 1's buffer past its budget: NC4 is NaN on every rank, the rest exact.
        budget = 8 if rank == 1 else 2**20
        mine = slice(rank, None, world)
        over = fed(
            NeuralCollapse(C, P, (weight, bias), memory_budget_bytes=budget),
            *(t[mine] for t in (features, labels)),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dropped = over.compute()
        warned = any("exceeded memory_budget_bytes" in str(w.message) for w in caught)
        # process_group honoured: each rank in a group of its own syncs with nobody.
        groups = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes both
        own = NeuralCollapse(C, P, (weight, bias), process_group=groups[rank])
        fed(own, *(t[mine] for t in (features, labels)))
        separate = own.compute()
        torch.save(
            {"alone": alone, "dropped": dropped, "warned": warned, "separate": separate},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.mark.slow  # two spawned processes importing torch and torchmetrics: ~8 s on 2 cores
def test_gloo_sync_with_an_idle_rank_a_rank_past_its_budget_and_own_groups(tmp_path, seed):
    """Two gloo ranks: one that saw no sample adds nothing (every key, NC4's count too, is the
    brute force of the other rank's samples); one past its NC4 budget makes NC4 NaN, with the
    warning, on both ranks while every other key is that of all samples; a metric given a
    ``process_group`` of its own rank syncs with no other (its own samples' brute force)."""
    features, labels, weight, bias = data(seed)
    args = (2, free_port(), features, labels, weight, bias, str(tmp_path))
    mp.spawn(_sync_with_an_idle_rank, args=args, nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_oracle(saved["alone"], features, labels, weight, bias)
        dropped = saved["dropped"]
        assert math.isnan(dropped["nc4_ncc_mismatch"]) and saved["warned"], rank
        rest = {k: v for k, v in dropped.items() if k != "nc4_ncc_mismatch"}
        assert_oracle(rest, features, labels, weight, bias, nc4=False)
        mine = slice(rank, None, 2)
        assert_oracle(saved["separate"], features[mine], labels[mine], weight, bias)
