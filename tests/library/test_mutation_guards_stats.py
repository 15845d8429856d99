"""Guards of ncfast/stats.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ncfast.stats import (
    ClassStats,
    InvalidInputError,
    InvalidStateError,
    all_reduced_state,
    check_state,
)
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.synthetic_features import F64
from tests.helpers.tolerances import stream_tolerances

META = torch.device("meta")


def invalid_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four samples of two features: one label out of range (5 of 3 classes), one NaN row."""
    features = torch.zeros(4, 2, dtype=F64)
    features[1, 0] = math.nan
    return features, torch.tensor([0, 1, 5, 2])


def test_repr_names_the_sizes_and_where_the_state_lives():
    stats = ClassStats(3, 2)
    assert repr(stats) == "ClassStats(num_classes=3, dim=2, unallocated)"
    stats.update(torch.zeros(1, 2), torch.tensor([0]))
    assert repr(stats) == "ClassStats(num_classes=3, dim=2, cpu)"


def test_on_invalid_survives_state_dict_from_state_dict_and_wrap():
    """A skipping accumulator saved and restored, or wrapped around its state, still skips (and
    counts) invalid samples instead of raising; a state without the setting raises."""
    features, labels = invalid_batch()
    saved = ClassStats(3, 2, on_invalid="skip").state_dict()
    assert saved["on_invalid"] == "skip"
    for stats in (ClassStats.from_state_dict(saved), ClassStats.wrap(saved, on_invalid="skip")):
        assert stats.on_invalid == "skip"
        stats.update(features, labels)
        assert stats.skipped == {"label_out_of_range": 1, "non_finite": 1}
        assert stats.counts.tolist() == [1, 0, 1]
    del saved["on_invalid"]
    restored = ClassStats.from_state_dict(saved)
    assert restored.on_invalid == "raise"
    with pytest.raises(InvalidInputError, match="1 sample"):
        restored.update(features, labels)


@pytest.mark.parametrize("key", ["num_classes", "dim"])
@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (True, TypeError)])
def test_from_state_dict_checks_the_saved_sizes_naming_them(key, value, error):
    """The saved sizes are checked where they are read, by from_state_dict, naming the key:
    0 is below the minimum 1 of both, and a bool is not a size."""
    saved = ClassStats(1, 1).state_dict()
    saved[key] = value
    with pytest.raises(error, match=rf"^from_state_dict: {key} must be an integer"):
        ClassStats.from_state_dict(saved)


def test_from_state_dict_accepts_one_class_of_one_feature():
    """The smallest sizes (C = 1, P = 1) are valid: the minimum of the checks is 1, not more."""
    stats = ClassStats(1, 1)
    stats.update(torch.tensor([[2.0], [4.0]], dtype=F64), torch.tensor([0, 0]))
    restored = ClassStats.from_state_dict(stats.state_dict())
    assert restored.counts.tolist() == [2]
    assert restored.class_means.tolist() == [[3.0]]  # (2 + 4) / 2, exact in float64


def test_from_state_dict_puts_the_state_on_the_device_asked_for():
    """An explicit device wins over the saved tensors' device (the meta device: no data, so
    any box has a second device)."""
    saved = ClassStats(2, 3, device="cpu").state_dict()
    restored = ClassStats.from_state_dict(saved, device="meta")
    assert restored.device == torch.device("meta")
    assert ClassStats.from_state_dict(saved).device == torch.device("cpu")


@pytest.mark.cuda
def test_from_state_dict_defaults_to_the_device_of_the_saved_tensors(monkeypatch):
    """Without a device, the new state is made where the saved tensors are: saved tensors on
    meta (a second device on any box) give a meta state. Loading reads the counts, which meta
    cannot, so the load itself is stubbed out here (the CUDA test below runs it whole)."""
    saved = {
        key: value.to(META) if isinstance(value, torch.Tensor) else value
        for key, value in ClassStats(2, 3, device="cpu").state_dict().items()
    }
    monkeypatch.setattr(ClassStats, "load_state_dict", lambda self, state_dict: self)
    assert ClassStats.from_state_dict(saved).device == META


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_state_dict_keeps_a_cuda_state_on_cuda():
    """Without a device, the state stays where the saved tensors are (a second real device:
    the CPU's default would be the same place)."""
    saved = ClassStats(2, 3, device="cuda").state_dict()
    assert ClassStats.from_state_dict(saved).device.type == "cuda"


def good_state(classes: int = 4, dim: int = 2) -> dict[str, torch.Tensor]:
    stats = ClassStats(classes, dim)
    stats.update(torch.arange(2.0 * dim, dtype=F64).reshape(2, dim), torch.tensor([0, 1]))
    return {k: v for k, v in stats.state_dict().items() if isinstance(v, torch.Tensor)}


def test_check_state_returns_int64_counts_and_float64_sums():
    """Whole-number counts of any real dtype come back as int64, sums of any float dtype as
    float64 (the merge adds them in place into int64 and float64 tensors)."""
    state = good_state()
    given = dict(state, counts=state["counts"].double(), invalid=state["invalid"].float())
    for key in ("shift", "sums", "scatter"):
        given[key] = state[key].float()  # small integers: exact in float32
    checked = check_state(given, 4, 2, "here")
    for key, value in checked.items():
        expected = torch.int64 if key in ("counts", "invalid") else torch.float64
        assert value.dtype == expected, key
        assert torch.equal(value, state[key].to(expected)), key


def test_check_state_takes_counts_up_to_two_to_the_62():
    state = good_state()
    for count in (125.0, 2.0**62):
        check_state(dict(state, counts=torch.tensor([count, 1, 0, 0], dtype=F64)), 4, 2, "here")
    # 2**62 + 2**10: the next float64 above 2**62.
    for count in (2.0**62 + 2.0**10, 1.5 * 2.0**62, -1.0, 0.5):
        too_many = dict(state, counts=torch.tensor([count, 1, 0, 0], dtype=F64))
        with pytest.raises(InvalidStateError, match=r"^here: 'counts' must hold counts"):
            check_state(too_many, 4, 2, "here")


def test_check_state_names_the_first_three_bad_counts():
    state = dict(good_state(), counts=torch.tensor([-1, -2, -3, -4]))
    with pytest.raises(InvalidStateError) as info:
        check_state(state, 4, 2, "here")
    assert str(info.value).endswith("got [-1.0, -2.0, -3.0]")


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex128])
@pytest.mark.parametrize("key", ["counts", "sums"])
def test_check_state_refuses_bool_and_complex_tensors(dtype, key):
    state = good_state()
    given = dict(state, **{key: state[key].to(dtype)})
    with pytest.raises(InvalidStateError, match=rf"'{key}' has dtype {dtype}; expected real"):
        check_state(given, 4, 2, "here")


def test_check_state_message_lists_every_shape_given_and_wanted():
    state = dict(good_state(), scatter=torch.zeros(3, 3))
    state["shift"] = state["shift"].tolist()
    with pytest.raises(InvalidStateError) as info:
        check_state(state, 4, 2, "here")
    assert str(info.value) == (
        "here: the state's tensors have shapes counts [4], shift (list), sums [4, 2], "
        "scatter [3, 3], invalid [2]; statistics of num_classes=4, dim=2 need counts [4], "
        "shift [4, 2], sums [4, 2], scatter [2, 2], invalid [2]"
    )
    with pytest.raises(InvalidStateError, match=r"^here: the state must be a dict, got list$"):
        check_state([state], 4, 2, "here")


# ------------------------------------------------------------- merges about a common shift
def test_a_merge_whose_incoming_side_holds_a_class_alone_stays_exact(seed):
    """Features of norm 1e6, spread 1e-2: class 2 has one sample, only in the incoming half,
    and class 1 only in the incoming half too. The merged class means and Σ_W equal one
    stream's within :func:`stream_tolerances` (a common shift taken from the side without the
    class, far from its sample, would add rounding of the offset's size)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 20 + [1] * 20 + [2])
    offset = 1e6 * torch.nn.functional.normalize(torch.randn(4, generator=g, dtype=F64), dim=0)
    centers = torch.randn(3, 4, generator=g, dtype=F64)
    features = offset + centers[labels] + 1e-2 * torch.randn(41, 4, generator=g, dtype=F64)
    mine, theirs = ClassStats(3, 4), ClassStats(3, 4)
    mine.update(features[:20], labels[:20])  # class 0 only
    theirs.update(features[20:], labels[20:])  # classes 1 and 2 (one sample)
    whole = ClassStats(3, 4)
    whole.update(features, labels)
    merged = mine.merge(theirs)
    atol_means, atol_sigma = stream_tolerances(features, labels)
    assert torch.equal(merged.counts, whole.counts)
    torch.testing.assert_close(merged.class_means, whole.class_means, rtol=0, atol=atol_means)
    torch.testing.assert_close(merged.sigma_w, whole.sigma_w, rtol=0, atol=atol_sigma)


def test_the_invalid_input_message_names_both_problems_and_the_way_out():
    """The whole message, as the user reads it: each problem counted, and the remedy."""
    features = torch.zeros(4, 2, dtype=F64)
    features[1, 0] = math.nan
    with pytest.raises(InvalidInputError) as info:
        ClassStats(3, 2).update(features, torch.tensor([0, 1, 5, 2]))
    assert str(info.value) == (
        "1 sample(s) with labels outside [0, 3) and 1 sample(s) with non-finite (NaN/inf) "
        "features in this batch; they were left out of the statistics. Fix the input, or pass "
        "ClassStats(..., on_invalid='skip') to skip and count them (see .skipped)."
    )


def test_wrap_keeps_the_precision_asked_for():
    state = good_state()
    assert ClassStats.wrap(state, precision="fast").precision == "fast"
    assert ClassStats.wrap(state).precision == "auto"


def test_reset_drops_the_cached_results():
    """Read right after reset (no update in between): the empty statistics, not the cache."""
    stats = ClassStats(2, 2)
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=F64), torch.tensor([0, 1]))
    stats.finalized()
    means, sigma_w = stats.reset().finalized()
    assert not means.any() and not sigma_w.any()
    assert stats.class_means.isnan().all()


def test_load_state_dict_errors_name_it_and_what_is_wrong():
    where = r"^ClassStats\.load_state_dict: "
    saved = ClassStats(3, 4, device="cpu").state_dict()
    with pytest.raises(InvalidStateError, match=where + "state_dict must be a dict, got list$"):
        ClassStats(3, 4).load_state_dict([saved])
    sizes_missing = {k: v for k, v in saved.items() if k not in ("num_classes", "dim")}
    with pytest.raises(
        InvalidStateError, match=where + r"state_dict lacks \['num_classes', 'dim'\]"
    ):
        ClassStats(3, 4).load_state_dict(sizes_missing)
    with pytest.raises(InvalidStateError, match=where + "state is for num_classes=3, dim=4; these"):
        ClassStats(3, 5).load_state_dict(saved)
    with pytest.raises(InvalidStateError, match=where + "'sums' contains NaN or inf$"):
        ClassStats(3, 4).load_state_dict(dict(saved, sums=torch.full((3, 4), math.nan)))


def test_statistics_created_on_a_device_read_as_empty():
    """Created with a device (the state allocated at once), read before any update."""
    stats = ClassStats(2, 2, device="cpu")
    means, sigma_w = stats.finalized()
    assert not means.any() and not sigma_w.any()


def test_update_errors_name_classstats_update():
    with pytest.raises(ValueError, match=r"^ClassStats\.update: features must have shape"):
        ClassStats(2, 3).update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


def test_the_first_batch_sets_the_device_even_when_empty():
    """An empty batch on another device (meta) allocates the state there and adds nothing."""
    stats = ClassStats(2, 2)
    stats.update(torch.zeros(0, 2, device="meta"), torch.zeros(0, dtype=torch.long, device="meta"))
    assert stats.device == torch.device("meta")


def test_a_batch_with_an_invalid_row_in_the_callers_mask_is_refused_at_once():
    """update_checked with the caller's validity mask: one row invalid, so on the CPU the
    batch raises at once and adds nothing (not deferred, not partly added)."""
    from ncfast.nc4 import valid_rows

    features, labels = invalid_batch()
    stats = ClassStats(3, 2)
    with pytest.raises(InvalidInputError, match="in this batch"):
        stats.update_checked(features, labels, valid=valid_rows(features, labels, 3))
    assert stats.skipped == {"label_out_of_range": 0, "non_finite": 0}
    assert stats.counts.tolist() == [0, 0, 0]


def test_the_fast_policy_is_used_where_asked(seed):
    """precision='fast' on the CPU runs the float32 product: Σ_W differs from the exact one
    (random float64 features: their float32 roundings do not cancel), by float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(64, 5, generator=g, dtype=F64)
    labels = torch.arange(64) % 2
    fast, exact = ClassStats(2, 5, precision="fast"), ClassStats(2, 5, precision="exact")
    fast.update(features, labels)
    exact.update(features, labels)
    assert fast.resolved_precision == "fast"
    assert not torch.equal(fast.sigma_w, exact.sigma_w)


def test_constructor_errors_name_classstats():
    with pytest.raises(ValueError, match=r"^ClassStats: num_classes must be an integer ≥ 1"):
        ClassStats(0, 2)
    with pytest.raises(ValueError, match=r"^ClassStats: precision must be one of"):
        ClassStats(2, 2, precision="float16")
    with pytest.raises(ValueError, match=r"^ClassStats: dim must be an integer ≥ 1"):
        ClassStats(2, 0)


# ------------------------------------------------------------------ reductions
def _settings_and_group_worker(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        # Every rank creates every group (collective); each keeps the one of itself alone.
        alone_group = [dist.new_group([r]) for r in range(world)][rank]
        stats = ClassStats(2, 2, on_invalid="skip", precision="exact")
        stats.invalid_advice = "the advice of the caller"
        features = torch.tensor([[float(rank), 1.0], [2.0, 3.0 * rank]], dtype=F64)
        stats.update(features, torch.tensor([0, 1]))
        local_means = stats.class_means  # computed and cached
        alone = stats.reduced(group=alone_group)
        everyone = stats.reduced()
        in_place_alone = ClassStats.from_state_dict(stats.state_dict())
        in_place_alone.all_reduce(group=alone_group)
        stats.all_reduce()
        # Far from the origin, small spread: the within-class scatter is exact only about a shift
        # within the class's spread; a shift pooled over the wrong group (twice the offset here)
        # cancels 1e16-sized terms in float64 (error ~1 against a scatter ~1e-6).
        far = ClassStats(2, 2, precision="exact")
        offsets = torch.tensor([[1e-3, -2e-3], [-5e-4, 1e-3], [2e-3, 4e-4]], dtype=F64)
        far.update(
            torch.cat([1e8 + offsets * (rank + 1), -1e8 + offsets]), torch.tensor([0] * 3 + [1] * 3)
        )
        far_local = far.sigma_w
        far_alone = far.reduced(group=alone_group)
        result = {
            "far_local": far_local,
            "far_alone": [far_alone.sigma_w, far_alone.class_means, far.class_means],
            "settings": [everyone.on_invalid, everyone.precision, everyone.invalid_advice],
            "alone_counts": [alone.counts, in_place_alone.counts],
            "everyone_counts": everyone.counts,
            "local_means": local_means,
            "in_place_means": stats.class_means,  # after the reduction: not the cached ones
            "reduced_means": everyone.class_means,
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_gloo_reductions_keep_the_settings_and_use_the_group_given(tmp_path):
    """reduced() keeps on_invalid, precision and the caller's advice; reduced(group=...) and
    all_reduce(group=...) reduce over that group only (here: each rank alone); all_reduce()
    drops the cached results of the local state."""
    mp.spawn(_settings_and_group_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["settings"] == ["skip", "exact", "the advice of the caller"]
        for counts in result["alone_counts"]:
            assert counts.tolist() == [1, 1]
        assert result["everyone_counts"].tolist() == [2, 2]
        # Alone in its group a rank keeps its own statistics (rounding about shifts within the
        # spread: relative error ~1e-9 on a scatter ~1e-6; the wrong group's shift gives ~1).
        alone_sigma_w, alone_means, local_means = result["far_alone"]
        torch.testing.assert_close(alone_sigma_w, result["far_local"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(alone_means, local_means, rtol=1e-15, atol=1e-6)
        # The same reduction of the same state: bit for bit.
        assert torch.equal(result["in_place_means"], result["reduced_means"])
        assert not torch.equal(result["in_place_means"], result["local_means"])


def test_reductions_without_a_process_group_name_the_caller():
    state = ClassStats(2, 3, device="cpu").state_dict()
    with pytest.raises(RuntimeError, match=r"^ClassStats\.all_reduce needs"):
        ClassStats(2, 3).all_reduce()
    with pytest.raises(RuntimeError, match=r"^ClassStats\.reduced needs"):
        ClassStats(2, 3).reduced()
    with pytest.raises(RuntimeError, match=r"^all_reduce needs"):
        all_reduced_state({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def test_a_merge_moves_the_incoming_statistics_to_this_device():
    """Statistics on another device (here the CPU, merged into statistics on the meta device:
    no data, so any box has a second device) are moved before they are combined."""
    incoming = ClassStats(2, 2)
    incoming.update(torch.ones(2, 2), torch.tensor([0, 1]))
    merged = ClassStats(2, 2, device="meta").merge(incoming)
    assert merged.device == torch.device("meta")
    assert all(
        t.device == torch.device("meta")
        for t in merged.state_dict().values()
        if isinstance(t, torch.Tensor)
    )
