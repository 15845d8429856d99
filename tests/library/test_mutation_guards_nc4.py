"""Guards of ncfast/nc4.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import pytest
import torch

from ncfast import nc4
from ncfast.backend import ops
from ncfast.nc4 import FeatureBuffer, NCCMismatch, count_mismatches, valid_rows
from ncfast.stats import ClassStats, InvalidStateError
from tests.helpers.synthetic_features import F64, make_data

META = torch.device("meta")
LOAD = r"^NCCMismatch\.load_state_dict: "
BAD_BUFFER = LOAD + r"the NC4 features must be \[B, 3\] tensors, each with a bool \[B\]"


def buffer_of(*row_counts: int, budget: int = 1 << 20) -> FeatureBuffer:
    """A buffer holding float64 ``[n, 2]`` batches (16 bytes a row), all rows valid."""
    buffer = FeatureBuffer(budget)
    for n in row_counts:
        buffer.add(torch.zeros(n, 2, dtype=F64), torch.ones(n, dtype=torch.bool))
    return buffer


def test_errors_name_the_call(seed):
    """The constructor's budget check and update's batch check start with the caller's name."""
    _, _, weight, bias = make_data([3, 4], 3, seed)
    with pytest.raises(ValueError, match=r"^NCCMismatch: memory_budget_bytes must be an integer"):
        NCCMismatch(weight, bias, memory_budget_bytes=-1)
    with pytest.raises(TypeError, match=r"^NCCMismatch: memory_budget_bytes must be an integer"):
        NCCMismatch(weight, bias, memory_budget_bytes=2.5)
    ncc = NCCMismatch(weight, bias)
    with pytest.raises(ValueError, match=r"^NCCMismatch\.update: features must have shape"):
        ncc.update(torch.zeros(2, 4, dtype=F64), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("features", "valid"),
    [
        ([torch.zeros(2, 4)], [torch.ones(2, dtype=torch.bool)]),  # a 2-D batch, wrong dim
        ([torch.zeros(2, 3, 1)], [torch.ones(2, dtype=torch.bool)]),  # 3-D
        ([torch.zeros(2, 3)], [torch.ones(3, dtype=torch.bool)]),  # a mask of another length
        ([torch.zeros(2, 3)], [torch.ones(2)]),  # a float mask
        ([torch.zeros(2, 3)] * 2, [torch.ones(2, dtype=torch.bool)]),  # a mask missing
        ([torch.zeros(2, 3)], None),  # masks not a list
        ("features", [torch.ones(2, dtype=torch.bool)]),  # features not a list
        ([1.0], [torch.ones(1, dtype=torch.bool)]),  # a list of other things than tensors
    ],
)
def test_a_bad_saved_buffer_is_an_invalid_state(seed, features, valid):
    """Every malformed buffer raises InvalidStateError naming load_state_dict and the expected
    shape (not a TypeError or ValueError from deeper down, nor nothing), and changes nothing."""
    _, _, weight, bias = make_data([3, 4], 3, seed)
    ncc = NCCMismatch(weight, bias)
    before = ncc.buffer
    state = {"features": features, "valid": valid, "overflowed": False}
    with pytest.raises(InvalidStateError, match=BAD_BUFFER):
        ncc.load_state_dict(state)
    assert ncc.buffer is before


def test_a_state_lacking_keys_names_them(seed):
    _, _, weight, bias = make_data([3, 4], 3, seed)
    with pytest.raises(InvalidStateError, match=LOAD + r"state_dict lacks \['valid'\]$"):
        NCCMismatch(weight, bias).load_state_dict({"features": [], "overflowed": False})
    with pytest.raises(InvalidStateError, match=LOAD + "the NC4 state must be a dict$"):
        NCCMismatch(weight, bias).load_state_dict([])


def test_an_overflowed_state_is_restored_overflowed(seed):
    _, _, weight, bias = make_data([3, 4], 3, seed)
    ncc = NCCMismatch(weight, bias)
    ncc.load_state_dict({"features": [], "valid": [], "overflowed": True})
    assert ncc.needs_second_pass is True
    ncc.reset()
    assert ncc.needs_second_pass is False
    assert ncc.buffer.nbytes == 0


def test_merging_an_overflowed_buffer_overflows(seed):
    """The other buffer holds nothing once overflowed, yet its samples are missing here: NC4
    needs a second pass."""
    features, labels, weight, bias = make_data([3, 4], 3, seed)
    ours, theirs = NCCMismatch(weight, bias), NCCMismatch(weight, bias, memory_budget_bytes=0)
    ours.update(features, labels)
    theirs.update(features, labels)
    assert (ours.needs_second_pass, theirs.needs_second_pass) == (False, True)
    ours.merge(theirs)
    assert ours.needs_second_pass is True
    assert ours.state_dict()["features"] == []


def test_an_empty_batch_is_not_kept():
    """Rows, not columns, make a batch empty: ``[0, 2]`` is not kept, ``[3, 0]`` is."""
    buffer = buffer_of(0)
    assert (buffer.features, buffer.valid, buffer.nbytes) == ([], [], 0)
    buffer.add(torch.zeros(3, 0, dtype=F64), torch.ones(3, dtype=torch.bool))
    assert [tuple(f.shape) for f in buffer.features] == [(3, 0)]
    assert len(buffer.valid) == 1


def test_an_overflowed_buffer_keeps_what_it_was_given():
    """An overflowed buffer ignores new batches: it does not drop again (restored state)."""
    kept = [torch.zeros(1, 2, dtype=F64)]
    buffer = FeatureBuffer(0, kept, [torch.ones(1, dtype=torch.bool)], overflowed=True)
    buffer.add(torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=torch.bool))
    assert buffer.features == kept
    assert buffer.overflowed is True


def test_nbytes_counts_every_batch_and_the_budget_is_inclusive():
    buffer = buffer_of(2, 3)
    assert buffer.nbytes == 5 * 16
    other = buffer_of(4, 1)
    buffer.budget = 10 * 16  # exactly what the merge needs: kept
    buffer.extend(list(other.features), list(other.valid), other.overflowed)
    assert (buffer.nbytes, len(buffer.features), buffer.overflowed) == (10 * 16, 4, False)
    buffer.extend([torch.zeros(1, 1, dtype=torch.uint8)], [torch.ones(1, dtype=torch.bool)], False)
    assert buffer.overflowed is True  # one byte over
    buffer.clear()
    assert (buffer.nbytes, buffer.overflowed, buffer.features) == (0, False, [])


def test_pairs_of_unequal_lists_raise():
    buffer = FeatureBuffer(1 << 20, [torch.zeros(1, 2)] * 2, [torch.ones(1, dtype=torch.bool)])
    with pytest.raises(ValueError, match="zip"):
        list(buffer.pairs())


def backends() -> list[str]:
    """The reference, and the native backend when it is in use."""
    return sorted({"reference", ops.BACKEND})


@pytest.mark.parametrize("backend", backends())
def test_counts_are_int64_on_the_device_of_the_means(seed, backend):
    """The meta device stands in for a second device: the counts are int64 there, and the
    batches (on the CPU) are moved there, with no batch and with one."""
    features, labels, weight, bias = make_data([3, 4], 3, seed)
    valid = torch.ones(len(labels), dtype=torch.bool)
    means = torch.zeros(2, 3, dtype=F64, device=META)
    present = torch.ones(2, dtype=torch.bool, device=META)
    on_meta = weight.to(META), bias.to(META), means, present
    with ops.use_backend(backend):
        for pairs in ([], [(features, valid)]):
            counts = count_mismatches(pairs, *on_meta)
            assert [(c.device, c.dtype) for c in counts] == [(META, torch.int64)] * 2


@pytest.mark.parametrize("backend", backends())
def test_the_classifier_is_moved_to_the_statistics_device(seed, backend):
    """Statistics on the meta device: the buffered batches and the classifier (on the CPU) are
    counted there."""
    features, labels, weight, bias = make_data([3, 4], 3, seed)
    stats = ClassStats(2, 3, device=META, on_invalid="skip")  # no data to check on meta
    stats.update(features.to(META), labels.to(META))
    ncc = NCCMismatch(weight, bias)
    ncc.update(features, labels)
    with ops.use_backend(backend):
        counts = ncc.count(stats)
    assert [(c.device, c.dtype) for c in counts] == [(META, torch.int64)] * 2


def test_the_classifier_is_copied_to_the_statistics_device(seed):
    """Statistics on the CPU, a weight moved to the meta device after construction (its public
    attribute): the copy of the weight to the CPU is what fails. Left there, the reference op
    would read the meta weight (no data) and return a count."""
    features, labels, weight, bias = make_data([3, 4], 3, seed)
    stats = ClassStats(2, 3)
    stats.update(features, labels)
    ncc = NCCMismatch(weight, bias)
    ncc.update(features, labels)
    ncc.weight = ncc.weight.to(META)
    with ops.use_backend("reference"), pytest.raises(NotImplementedError, match="meta tensor"):
        ncc.count(stats)


def test_one_sample_is_a_fraction_of_one():
    """One sample of class 0 (the only present class, so its nearest center), classified as
    class 1: NC4 = 1/1."""
    ncc = NCCMismatch(torch.zeros(2, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    stats = ClassStats(2, 2)
    features, labels = torch.ones(1, 2, dtype=F64), torch.tensor([0])
    stats.update(features, labels)
    ncc.update(features, labels)
    assert ncc.compute(stats) == 1.0


def test_a_batch_of_zero_width_rows_is_kept():
    """A classifier of dim 0 is allowed: its batches ``[B, 0]`` have rows and are buffered."""
    ncc = NCCMismatch(torch.zeros(2, 0))
    ncc.update(torch.zeros(3, 0), torch.tensor([0, 1, 0]))
    assert [tuple(f.shape) for f in ncc.state_dict()["features"]] == [(3, 0)]


def test_a_given_validity_mask_is_kept_not_recomputed(seed):
    """add_checked keeps the mask its caller computed (valid_rows), the tensor itself."""
    features, labels, weight, bias = make_data([3, 4], 3, seed)
    ncc = NCCMismatch(weight, bias)
    valid = valid_rows(features, labels, 2)
    ncc.add_checked(features, labels, valid)
    assert ncc.state_dict()["valid"][0] is valid


def test_a_batch_of_exactly_the_budget_is_kept():
    buffer = buffer_of(2, budget=2 * 16)
    ncc = NCCMismatch(torch.zeros(2, 2, dtype=F64), memory_budget_bytes=2 * 16)
    ncc.update(torch.zeros(2, 2, dtype=F64), torch.tensor([0, 1]))
    assert (buffer.nbytes, buffer.overflowed, ncc.needs_second_pass) == (2 * 16, False, False)


def test_validity_is_computed_on_the_device_of_the_batch():
    """A batch on the meta device: its mask is computed there (its scratch counter too)."""
    features = torch.zeros(3, 2, device=META)
    valid = valid_rows(features, torch.tensor([0, 1, 5], device=META), 2)
    assert (valid.device, valid.dtype, tuple(valid.shape)) == (META, torch.bool, (3,))


def test_the_classifier_is_kept_in_float64_on_the_device_of_the_weight():
    """A float32 weight and bias are kept as float64; the bias (here on the CPU) joins the
    weight's device (meta)."""
    weight, bias = torch.zeros(2, 3), torch.zeros(2)
    ncc = NCCMismatch(weight, bias)
    assert (ncc.weight.dtype, ncc.bias.dtype) == (F64, F64)
    ncc = NCCMismatch(weight.to(META), bias)
    assert [(t.device, t.dtype) for t in (ncc.weight, ncc.bias)] == [(META, F64)] * 2


def test_the_validity_scratch_counter_is_on_the_batch_device(monkeypatch):
    """The scratch counter valid_rows hands the kernel lives on the batch's device (meta stands
    in for a second device; the kernel is replaced by a spy, as nothing can be counted there)."""
    seen: list[torch.device] = []

    def spy(features, labels, num_classes, scratch):
        seen.append(scratch.device)
        assert scratch.dtype == torch.int64 and scratch.shape == (2,)
        return torch.ones(features.shape[0], dtype=torch.bool, device=features.device)

    monkeypatch.setattr(nc4, "count_invalid_rows_", spy)
    valid_rows(torch.zeros(3, 2, device=META), torch.zeros(3, dtype=torch.int64, device=META), 2)
    assert seen == [META]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_validity_of_a_cuda_batch_is_computed_on_cuda():
    """The scratch counter lives on the batch's device (a second real device: on the CPU it
    would take the batch's counts across devices)."""
    valid = valid_rows(torch.zeros(3, 2, device="cuda"), torch.tensor([0, 1, 5], device="cuda"), 2)
    assert valid.device.type == "cuda"
    assert valid.tolist() == [True, True, False]
