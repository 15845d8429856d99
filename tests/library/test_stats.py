"""ClassStats: merging, distributed reduction, serialisation and bad input."""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import ncfast
from ncfast.backend import reference
from ncfast.nc4 import NCCMismatch
from ncfast.stats import ClassStats, InvalidInputError, InvalidStateError
from tests.helpers.assertions import assert_same_metrics, assert_same_stats
from tests.helpers.feeding import fed, stream
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.synthetic_features import make_data
from tests.helpers.tolerances import EPS, oracle_rtol, stream_tolerances


def test_merge_of_seven_random_splits_equals_one_stream(seed):
    features, labels, _, _ = make_data([90, 0, 150, 60, 33], 9, seed, offset=50.0)
    one = ClassStats(5, 9)
    for chunk in torch.split(torch.arange(len(labels)), 40):
        one.update(features[chunk], labels[chunk])
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(len(labels) - 1, generator=g)[:6] + 1).values.tolist()
    bounds = [0, *cuts, len(labels)]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part = ClassStats(5, 9)
        for chunk in torch.split(torch.arange(lo, hi), 17):
            part.update(features[chunk], labels[chunk])
        parts.append(part)
    merged = ClassStats(5, 9)
    for part in parts:
        merged.merge(part)
    assert_same_stats(one, merged, features, labels)
    # NC1 = tr(Σ_W Σ_B^†)/C is linear in Σ_W (relative error ≤ P·δΣ_W/λ_min(Σ_W)) and depends
    # on M̄ through Σ_B^† (relative error ≤ 2·√C·δμ/σ_min(M̄)).
    atol_means, atol_sigma = stream_tolerances(features, labels)
    lam_min = float(torch.linalg.eigvalsh(one.sigma_w)[0])
    sigma_min = float(torch.linalg.svdvals(one.centered_means)[-1])
    rtol = 9 * atol_sigma / lam_min + 2 * 4**0.5 * atol_means / sigma_min
    r1, r2 = ncfast.nc_metrics(one), ncfast.nc_metrics(merged)
    assert r1["nc1"] == pytest.approx(r2["nc1"], rel=rtol)


def test_merge_near_collapse_keeps_precision(seed):
    """Different first-batch shifts in each part must not cost precision when merged."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 8, generator=g, dtype=torch.float64) * 1e4 + 1e6
    labels = torch.arange(3).repeat(300)
    features = means[labels] + 1e-2 * torch.randn(900, 8, generator=g, dtype=torch.float64)
    one = fed(ClassStats(3, 8), features, labels)
    merged = fed(ClassStats(3, 8), features[:1], labels[:1])
    merged.merge(fed(ClassStats(3, 8), features[1:500], labels[1:500]))
    merged.merge(fed(ClassStats(3, 8), features[500:], labels[500:]))
    assert_same_stats(one, merged, features, labels)
    # The check is sharp: a merge that lost the shifts (Σ hhᵀ − Nμμᵀ) errs by eps·max‖h‖²,
    # 1e5× the tolerance used, and 1e1× Σ_W itself.
    _, atol_sigma = stream_tolerances(features, labels)
    naive_error = EPS * float(features.norm(dim=1).max()) ** 2
    assert atol_sigma < 1e-5 * naive_error and naive_error > 10 * float(one.sigma_w.abs().max())


def test_merge_adds_the_skipped_counts(seed):
    """Invalid samples counted by one stream survive a merge: skip mode reports the total,
    raise mode still raises when a result is read."""
    features, labels, _, _ = make_data([20, 30, 25], 4, seed)
    nan_rows = torch.full((2, 4), float("nan"))
    first = ClassStats(3, 4, on_invalid="skip")
    first.update(torch.cat([features[:40], nan_rows]), torch.cat([labels[:40], labels[:2]]))
    second = ClassStats(3, 4, on_invalid="skip")
    second.update(
        torch.cat([features[40:], features[:3]]), torch.cat([labels[40:], -labels[:3] - 1])
    )
    assert first.skipped == {"label_out_of_range": 0, "non_finite": 2}
    assert second.skipped == {"label_out_of_range": 3, "non_finite": 0}
    merged = ClassStats(3, 4, on_invalid="skip").merge(first).merge(second)
    assert merged.skipped == {"label_out_of_range": 3, "non_finite": 2}
    assert_same_stats(merged, fed(ClassStats(3, 4), features, labels), features, labels)
    # raise mode: counts deferred from another stream (the CUDA path) make reading raise
    deferred = ClassStats(3, 4).load_state_dict(first.state_dict())
    clean = fed(ClassStats(3, 4), features[40:], labels[40:])
    with pytest.raises(InvalidInputError, match=r"2 sample\(s\) with non-finite"):
        ncfast.nc_metrics(clean.merge(deferred))


def test_state_dict_round_trip_through_safe_torch_load(seed):
    features, labels, _, _ = make_data([30, 40], 4, seed)
    stats = fed(ClassStats(2, 4), features, labels)
    buffer = io.BytesIO()
    torch.save(stats.state_dict(), buffer)
    buffer.seek(0)
    loaded = ClassStats.from_state_dict(torch.load(buffer, weights_only=True))
    assert_same_stats(stats, loaded)  # bit for bit
    # Continuing the stream after a reload equals one uninterrupted stream, bit for bit: the
    # same operations on the same state.
    more, more_labels, _, _ = make_data([10, 20], 4, seed + 1)
    stats.update(more, more_labels)
    loaded.update(more, more_labels)
    assert_same_stats(stats, loaded)


def test_load_state_dict_rejects_mismatch():
    stats = fed(ClassStats(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes=3, dim=4"):
        ClassStats(3, 5).load_state_dict(stats.state_dict())
    bad = stats.state_dict()
    bad["scatter"] = torch.zeros(2, 2)
    with pytest.raises(InvalidStateError, match=r"scatter \[2, 2\]"):
        ClassStats(3, 4).load_state_dict(bad)
    del bad["scatter"]
    with pytest.raises(InvalidStateError, match="scatter"):
        ClassStats(3, 4).load_state_dict(bad)


def _all_reduce_worker(rank, world, port, features, labels, out_dir):
    with gloo_group(rank, world, port):
        stats = ClassStats(4, features.shape[1], on_invalid="skip")
        # Invalid samples on each rank: rank r skips r + 1 NaN rows and 2·r + 1 bad labels.
        bad_features = torch.full((rank + 1, features.shape[1]), float("nan"))
        stats.update(bad_features, torch.zeros(rank + 1, dtype=torch.long))
        stats.update(features[: 2 * rank + 1], torch.full((2 * rank + 1,), 4))
        # Unequal, interleaved shards: rank 0 never sees class 3.
        mine = torch.arange(len(labels))[rank::world]
        if rank == 0:
            mine = mine[labels[mine] != 3]
        else:
            extra = torch.arange(len(labels))[0::world]
            mine = torch.cat([mine, extra[labels[extra] == 3]])
        for chunk in torch.split(mine, 23):
            stats.update(features[chunk], labels[chunk])
        local = stats.state_dict()
        reduced = stats.reduced()
        saved = {"reduced": reduced.state_dict(), "local": local, "after": stats.state_dict()}
        saved["in_place"] = stats.all_reduce().state_dict()
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))


def test_all_reduce_across_two_gloo_processes_equals_one_stream(tmp_path, seed):
    """``reduced()`` returns the statistics of all ranks' samples and leaves the local ones as
    they were (bit for bit); ``all_reduce()`` does the same reduction in place."""
    features, labels, _, _ = make_data([50, 70, 40, 60], 6, seed, offset=1e3)
    mp.spawn(
        _all_reduce_worker,
        args=(2, free_port(), features, labels, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    one = fed(ClassStats(4, 6), features, labels)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for state in saved:
        reduced = ClassStats.from_state_dict(state["reduced"])
        assert_same_stats(one, reduced, features, labels)
        assert reduced.skipped == {"label_out_of_range": 1 + 3, "non_finite": 1 + 2}
        for key in ("counts", "shift", "sums", "scatter", "invalid"):
            assert torch.equal(state["after"][key], state["local"][key]), key
            assert torch.equal(state["in_place"][key], state["reduced"][key]), key
        assert int(state["local"]["counts"].sum()) < len(labels)
    # Every rank holds identical statistics.
    for key, value in saved[0]["reduced"].items():
        other = saved[1]["reduced"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_all_reduce_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="all_reduce needs.*init_process_group"):
        ClassStats(2, 3).all_reduce()
    with pytest.raises(RuntimeError, match="reduced needs.*init_process_group"):
        ClassStats(2, 3).reduced()


# ------------------------------------------------------------------ bad input
def test_labels_out_of_range_raise_and_batch_is_not_added():
    stats = ClassStats(3, 2)
    stats.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(InvalidInputError, match=r"2 sample\(s\) with labels outside \[0, 3\)"):
        stats.update(torch.randn(3, 2), torch.tensor([0, 3, -1]))
    assert stats.num_samples == 4  # nothing lost, nothing added


def test_non_finite_features_raise():
    features = torch.randn(5, 3)
    features[1, 2] = float("nan")
    features[3, 0] = float("inf")
    with pytest.raises(InvalidInputError, match=r"2 sample\(s\) with non-finite"):
        ClassStats(2, 3).update(features, torch.tensor([0, 1, 0, 1, 0]))


def test_skip_mode_counts_and_drops_invalid_samples(seed):
    features, labels, _, _ = make_data([20, 30, 25], 4, seed)
    dirty_f = torch.cat([features, torch.full((2, 4), float("nan")), features[:3]])
    dirty_y = torch.cat([labels, torch.tensor([0, 1]), torch.tensor([7, -2, 3])])
    skip = fed(ClassStats(3, 4, on_invalid="skip"), dirty_f, dirty_y)
    clean = fed(ClassStats(3, 4), features, labels)
    assert skip.skipped == {"label_out_of_range": 3, "non_finite": 2}
    assert_same_stats(clean, skip, features, labels)


def test_deferred_invalid_counts_are_reported_when_results_are_read():
    """The device path (CUDA) only counts invalid samples; reading a result raises."""
    stats = fed(ClassStats(2, 3), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    state = stats.state_dict()
    state["invalid"] = torch.tensor([5, 1])
    deferred = ClassStats(2, 3).load_state_dict(state)
    with pytest.raises(InvalidInputError, match=r"5 sample\(s\) with labels outside.*1 sample"):
        ncfast.nc_metrics(deferred)
    with pytest.raises(InvalidInputError):
        _ = deferred.sigma_w


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), r"shape \[B, 3\]"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), r"shape \[B, 3\].*\[4, 5\]"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), r"labels must have shape \[B\]"),
        (torch.randn(4, 3), torch.zeros(4), "labels must be integer class indices"),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), "floating dtype"),
        (np.zeros((4, 3)), torch.zeros(4, dtype=torch.long), "features must be a torch.Tensor"),
        (torch.randn(4, 3), [0, 1, 0, 1], "labels must be a torch.Tensor"),
    ],
)
def test_wrong_shapes_and_types_name_the_argument(features, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ClassStats(2, 3).update(features, labels)


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="num_classes must be an integer ≥ 1"):
        ClassStats(0, 3)
    with pytest.raises(ValueError, match="dim must be an integer ≥ 1"):
        ClassStats(2, -1)
    with pytest.raises(ValueError, match="on_invalid"):
        ClassStats(2, 3, on_invalid="ignore")
    stats = ClassStats(np.int64(3), np.int32(4))  # numpy integers are integers
    assert (stats.num_classes, stats.dim) == (3, 4) and type(stats.num_classes) is int


WEIGHT = torch.zeros(3, 8)


@pytest.mark.parametrize(
    ("build", "argument", "kind"),
    [
        (lambda: ClassStats(True, 8), "num_classes", "bool"),
        (lambda: ClassStats(3, False), "dim", "bool"),
        (lambda: ClassStats(3.0, 8), "num_classes", "float"),
        (lambda: ClassStats("3", 8), "num_classes", "str"),
        (lambda: ncfast.Measurement(True, 8), "num_classes", "bool"),
        (lambda: ncfast.Measurement(3, 8.0), "dim", "float"),
        (lambda: ncfast.Measurement(3, 8, memory_budget_bytes=True), "memory_budget_bytes", "bool"),
        (lambda: ncfast.Measurement(3, 8, memory_budget_bytes=1e9), "memory_budget_bytes", "float"),
        (lambda: NCCMismatch(WEIGHT, memory_budget_bytes=False), "memory_budget_bytes", "bool"),
        (lambda: NCCMismatch(WEIGHT, memory_budget_bytes=2.5), "memory_budget_bytes", "float"),
    ],
)
def test_counts_and_sizes_must_be_integers_not_bools(build, argument, kind):
    """``True`` is an int to Python, not a class count: refused with the argument's name."""
    with pytest.raises(TypeError, match=rf"{argument} must be an integer, got {kind}"):
        build()


def test_fewer_than_two_classes_is_an_error():
    stats = fed(ClassStats(4, 3), torch.randn(5, 3), torch.full((5,), 2))
    with pytest.raises(ValueError, match="at least two classes.*1 of 4"):
        ncfast.nc_metrics(stats)
    with pytest.raises(ValueError, match="at least two classes.*0 of 4"):
        ncfast.nc_metrics(ClassStats(4, 3))


def test_merge_rejects_other_shapes():
    with pytest.raises(ValueError, match="num_classes=3"):
        ClassStats(2, 3).merge(ClassStats(3, 3))
    with pytest.raises(TypeError, match="ClassStats"):
        ClassStats(2, 3).merge({"counts": 1})


def test_classifier_shape_and_lambda_are_checked():
    stats = fed(ClassStats(3, 2), torch.randn(9, 2), torch.arange(3).repeat(3))
    with pytest.raises(ValueError, match=r"weight must have shape \[num_classes, dim\] = \[3, 2\]"):
        ncfast.nc_metrics(stats, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \[3\]"):
        ncfast.nc_metrics(stats, torch.randn(3, 2), torch.randn(2))
    with pytest.raises(ValueError, match="NaN/inf"):
        ncfast.nc_metrics(stats, torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="weight_decay"):
        ncfast.nc_metrics(stats, torch.randn(3, 2), weight_decay=-1.0)
    with pytest.raises(ValueError, match="bias was given without weight"):
        ncfast.nc_metrics(stats, None, torch.randn(3))


def test_classifier_is_checked_where_it_is_given():
    """One classifier check (ncfast.checks.check_classifier) for every entry point: the error
    comes at construction and names the argument."""
    with pytest.raises(ValueError, match=r"Measurement: weight must have shape .* = \[3, 2\]"):
        ncfast.Measurement(3, 2, torch.randn(2, 3))
    with pytest.raises(ValueError, match="Measurement: bias was given without weight"):
        ncfast.Measurement(3, 2, None, torch.zeros(3))
    with pytest.raises(TypeError, match="NCCMismatch: weight must be a torch.Tensor, got list"):
        NCCMismatch([[1.0, 0.0]])
    with pytest.raises(
        ValueError, match=r"NCCMismatch: weight must have shape \[num_classes, dim\]"
    ):
        NCCMismatch(torch.zeros(3))
    with pytest.raises(ValueError, match=r"NCCMismatch: bias must be a tensor of shape \[3\]"):
        NCCMismatch(torch.zeros(3, 2), torch.zeros(2))
    stats = fed(ClassStats(3, 2), torch.randn(9, 2), torch.arange(3).repeat(3))
    with pytest.raises(TypeError, match="nc_metrics: bias must be a tensor of shape"):
        ncfast.nc_metrics(stats, torch.randn(3, 2), [0.0, 0.0, 0.0])


def test_nc4_second_pass_must_be_an_iterable_of_pairs(seed):
    g = torch.Generator().manual_seed(seed)
    features, labels = torch.randn(12, 2, generator=g), torch.arange(3).repeat(4)
    stats = fed(ClassStats(3, 2), features, labels)
    ncc = NCCMismatch(torch.randn(3, 2, generator=g), memory_budget_bytes=0)
    ncc.update(features, labels)
    assert ncc.needs_second_pass
    where = r"NCCMismatch.compute\(second_pass\)"
    with pytest.raises(TypeError, match=rf"{where}: batches must be an iterable of \(features"):
        ncc.compute(stats, second_pass=3)
    with pytest.raises(ValueError, match=rf"{where}: each batch must be a \(features, labels\)"):
        ncc.compute(stats, second_pass=[(features, labels, labels)])
    with pytest.raises(TypeError, match=rf"{where}: labels must be integer class indices"):
        ncc.compute(stats, second_pass=lambda: [(features, labels.float())])
    fraction = ncc.compute(
        stats, second_pass=lambda: [(features[:5], labels[:5]), (features[5:], labels[5:])]
    )
    assert fraction == ncc.compute(stats, second_pass=[(features, labels)])


def test_state_layout_is_new_state_and_wrap_works_in_place(seed):
    """ClassStats keeps the layout of ncfast.backend.reference.new_state; wrap() updates the
    given tensors themselves; finalized() is cached until the state changes."""
    c, p = 3, 4
    fresh = reference.new_state(c, p)
    state = ClassStats(c, p, device="cpu").state_dict()
    assert list(fresh) == list(reference.STATE_KEYS)
    for key in reference.STATE_KEYS:
        assert (state[key].shape, state[key].dtype) == (fresh[key].shape, fresh[key].dtype), key
        assert not fresh[key].any()
    g = torch.Generator().manual_seed(seed)
    features, labels = torch.randn(10, p, generator=g), torch.tensor([0, 1] * 5)
    wrapped = ClassStats.wrap(fresh)
    wrapped.update(features, labels)
    assert int(fresh["counts"].sum()) == 10  # written into the caller's tensors
    final = wrapped.finalized()
    assert wrapped.finalized() is final  # cached: no recomputation, no copy
    assert not final[0][2].any()  # the absent class has a zero row, not NaN
    wrapped.update(features, labels)
    assert wrapped.finalized() is not final


def test_device_mismatch_is_a_clear_error():
    stats = ClassStats(2, 3, device="meta")
    with pytest.raises(ValueError, match="statistics live on meta"):
        stats.update(torch.randn(2, 3), torch.tensor([0, 1]))


# ------------------------------------------------------------------ Measurement
def test_every_update_returns_none(seed):
    """As torchmetrics' ``update``: nothing to chain on, so no caller relies on a return."""
    features, labels, weight, bias = make_data([10, 12], 3, seed)
    assert ClassStats(2, 3).update(features, labels) is None
    assert NCCMismatch(weight, bias).update(features, labels) is None
    assert ncfast.Measurement(2, 3, weight, bias).update(features, labels) is None


def test_measurement_reset_merge_and_state_dict(seed):
    features, labels, weight, bias = make_data([40, 55, 35], 6, seed)
    expected = stream(features, labels, 3, 25, weight, bias, lam=0.1).compute()
    assert expected["num_samples"] == len(labels) and "nc4_ncc_mismatch" in expected
    # reset: a used measurement, reset and fed the same batches, equals a fresh one bit for bit.
    used = stream(features[:70], labels[:70], 3, 25, weight, bias, lam=0.1)
    used.compute()
    used.reset()
    for start in range(0, len(labels), 25):
        used.update(features[start : start + 25], labels[start : start + 25])
    assert_same_metrics(used.compute(), expected, rtol=0.0)
    # merge: two streams merged hold every sample. Two float64 accumulations of the same
    # samples differ by rounding: the brute-force bound N·eps·κ of these features covers it.
    merged = stream(features[:61], labels[:61], 3, 25, weight, bias, lam=0.1)
    merged.merge(stream(features[61:], labels[61:], 3, 25, weight, bias, lam=0.1))
    assert_same_metrics(merged.compute(), expected, rtol=oracle_rtol(features, labels, 3, 0.1))
    # state_dict through a safe torch.load, then the rest of the pass: the same operations on
    # the same state as one uninterrupted pass, bit for bit.
    first = stream(features[:50], labels[:50], 3, 25, weight, bias, lam=0.1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ncfast.Measurement(3, 6, weight, bias, weight_decay=0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for start in range(50, len(labels), 25):
        resumed.update(features[start : start + 25], labels[start : start + 25])
    assert_same_metrics(resumed.compute(), expected, rtol=0.0)


def test_measurement_merge_and_load_refuse_what_does_not_fit(seed):
    features, labels, weight, bias = make_data([10, 12, 9], 4, seed)
    with_classifier = stream(features, labels, 3, 8, weight, bias)
    with pytest.raises(ValueError, match="different classifiers"):
        with_classifier.merge(stream(features, labels, 3, 8, weight * 2, bias))
    with pytest.raises(ValueError, match="one measurement has a classifier"):
        with_classifier.merge(stream(features, labels, 3, 8))
    with pytest.raises(TypeError, match="must be a Measurement"):
        with_classifier.merge(with_classifier.stats)
    with pytest.raises(ValueError, match="holds no NC4 buffer"):
        with_classifier.load_state_dict(stream(features, labels, 3, 8).state_dict())
    with pytest.raises(InvalidStateError, match="'stats'"):
        with_classifier.load_state_dict({})
    # A buffer past the budget survives the merge as "needs a second pass".
    small = stream(features, labels, 3, 8, weight, bias, memory_budget_bytes=features.numel() * 8)
    small.merge(stream(features, labels, 3, 8, weight, bias))
    assert small.needs_second_pass
