"""Mutation guards of ncfast/tokens.py: the refusals of each entry point (exact messages that name
the function, the argument and what was wrong), the bounds of ``ignore_index`` and of the
vocabulary on both sides, the count of ignored positions across batches and after a reset, and
the second pass (with its own refusals). The values themselves are test_tokens.py's, against the
float64 oracle."""

from __future__ import annotations

import pytest
import torch

from ncfast.stats import InvalidInputError
from ncfast.tokens import IGNORE_INDEX, TokenMeasurement, next_token_labels, token_rows
from tests.helpers.assertions import raises_exactly

I = IGNORE_INDEX  # the ignored label, short in the tables below


# ----------------------------------------------------------------------- next_token_labels
def test_next_token_labels_refuses_what_is_not_a_batch_of_ids():
    with raises_exactly(
        ValueError,
        "next_token_labels: input_ids must be a [B, T] tensor of token ids, got <class 'list'>",
    ):
        next_token_labels([[1, 2]])
    with raises_exactly(
        ValueError, "next_token_labels: input_ids must be a [B, T] tensor of token ids, got [3]"
    ):
        next_token_labels(torch.tensor([1, 2, 3]))
    with raises_exactly(
        TypeError, "next_token_labels: input_ids must be integer class indices, got torch.float32"
    ):
        next_token_labels(torch.ones(1, 3))
    with raises_exactly(
        TypeError, "next_token_labels: ignore_index must be an integer, got float -100.0"
    ):
        next_token_labels(torch.ones(1, 3, dtype=torch.long), ignore_index=-100.0)
    with raises_exactly(
        ValueError,
        f"next_token_labels: ignore_index must be an integer ≥ {-(2**62)}, got {-(2**62) - 1}",
    ):
        next_token_labels(torch.ones(1, 3, dtype=torch.long), ignore_index=-(2**62) - 1)
    ids = torch.ones(2, 3, dtype=torch.long)
    with raises_exactly(
        ValueError,
        "next_token_labels: attention_mask must be a tensor of the shape of input_ids [2, 3], "
        "got torch.Size([2, 2])",
    ):
        next_token_labels(ids, torch.ones(2, 2))
    with raises_exactly(
        ValueError,
        "next_token_labels: attention_mask must be a tensor of the shape of input_ids [2, 3], "
        "got list",
    ):
        next_token_labels(ids, [[1, 1, 1], [1, 1, 1]])


def test_next_token_labels_with_its_own_ignore_index_at_the_lowest_bound():
    """The lowest ignore_index accepted (−2⁶²) marks the last position and both paddings."""
    low = -(2**62)
    ids = torch.tensor([[5, 6, 7, 8], [0, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    assert next_token_labels(ids, mask, ignore_index=low).tolist() == [
        [6, 7, 8, low],
        [low, 4, low, low],
    ]
    assert next_token_labels(ids, None).tolist() == [[6, 7, 8, I], [3, 4, 0, I]]


# ------------------------------------------------------------- the batches of every entry point
def _second_pass(features, labels):
    """compute() of a measurement of two classes past a zero NC4 budget, reading ``(features,
    labels)`` as its second pass."""
    tokens = TokenMeasurement(4, 3, torch.randn(4, 3), memory_budget_bytes=0)
    tokens.update(torch.eye(3)[:2].repeat(3, 1) + 0.1 * torch.randn(6, 3), torch.arange(6) % 2)
    return tokens.compute([(features, labels)])


@pytest.mark.parametrize(
    "call, where",
    [
        (token_rows, "token_rows"),
        (lambda f, y: TokenMeasurement(4, 3).update(f, y), "TokenMeasurement.update"),
        (_second_pass, "TokenMeasurement.compute(second_pass)"),
    ],
    ids=["token_rows", "update", "second_pass"],
)
def test_every_entry_point_refuses_a_bad_batch_in_its_own_name(call, where):
    features, labels = torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.long)
    with raises_exactly(
        TypeError, f"{where}: features and labels must be torch.Tensors, got list and Tensor"
    ):
        call(features.tolist(), labels)
    with raises_exactly(
        TypeError, f"{where}: features and labels must be torch.Tensors, got Tensor and list"
    ):
        call(features, labels.tolist())
    bad_shapes = [
        (torch.randn(5), torch.zeros(5, dtype=torch.long)),  # 1-d features
        (torch.randn(1, 2, 5, 3), torch.zeros(1, 2, 5, dtype=torch.long)),  # 4-d features
        (features, torch.zeros(2, 4, dtype=torch.long)),  # labels of another length
    ]
    for f, y in bad_shapes:
        with raises_exactly(
            ValueError,
            f"{where}: features must be [B, T, P] with labels [B, T] (or [N, P] with [N]); got "
            f"features {list(f.shape)} and labels {list(y.shape)}",
        ):
            call(f, y)
    with raises_exactly(
        TypeError, f"{where}: labels must be integer class indices, got torch.float32"
    ):
        call(features, labels.float())
    with raises_exactly(ValueError, f"{where}: labels are on meta but features on cpu"):
        call(features, labels.to("meta"))


def test_token_rows_keeps_the_positions_not_ignored_in_order():
    features = torch.arange(24.0).reshape(2, 4, 3)
    labels = torch.tensor([[1, I, 2, I], [I, 0, 3, 7]])
    rows, row_labels = token_rows(features, labels)
    assert row_labels.tolist() == [1, 2, 0, 3, 7]
    assert torch.equal(rows, features.reshape(8, 3)[[0, 2, 5, 6, 7]])
    # [N, P] rows are taken as they are; another ignore_index is honoured.
    rows, row_labels = token_rows(features.reshape(8, 3), labels.reshape(8), ignore_index=7)
    assert row_labels.tolist() == [1, I, 2, I, I, 0, 3]
    assert torch.equal(rows, features.reshape(8, 3)[:7])


# ------------------------------------------------------------------------ TokenMeasurement
def test_ignore_index_must_lie_outside_the_vocabulary_on_both_sides():
    for inside in (0, 9):
        with raises_exactly(
            ValueError,
            f"TokenMeasurement: ignore_index={inside} is a token id of the vocabulary [0, 10); "
            "use a value outside it (-100 by default)",
        ):
            TokenMeasurement(10, 3, ignore_index=inside)
    for outside in (-1, 10, -(2**62)):
        assert TokenMeasurement(10, 3, ignore_index=outside).ignore_index == outside
    with raises_exactly(
        ValueError,
        f"TokenMeasurement: ignore_index must be an integer ≥ {-(2**62)}, got {-(2**62) - 1}",
    ):
        TokenMeasurement(10, 3, ignore_index=-(2**62) - 1)
    with raises_exactly(ValueError, "TokenMeasurement: vocab_size must be an integer ≥ 1, got 0"):
        TokenMeasurement(0, 3)
    assert TokenMeasurement(1, 3).vocab_size == 1


def test_labels_outside_the_vocabulary_are_refused_with_an_example():
    tokens = TokenMeasurement(4, 2)
    features = torch.randn(1, 6, 2)
    tokens.update(features, torch.tensor([[0, 3, I, 3, 0, I]]))  # the bounds' inside
    with raises_exactly(
        InvalidInputError,
        "TokenMeasurement.update: labels must be token ids in [0, vocab_size=4) or "
        "ignore_index=-100; 2 label(s) are not, e.g. -1 (does the tokenizer's vocabulary "
        "match the model's output head?)",
    ):
        tokens.update(features, torch.tensor([[0, -1, I, 4, 0, I]]))
    assert tokens.num_tokens == 4  # the refused batch added nothing
    # Skipping instead: the two are counted invalid, the rest measured.
    skipping = TokenMeasurement(4, 2, on_invalid="skip")
    skipping.update(features, torch.tensor([[0, -1, I, 4, 1, I]]))
    assert skipping.num_tokens == 2 and skipping.stats.skipped["label_out_of_range"] == 2
    assert skipping.ignored_tokens == 2


def test_ignored_positions_are_counted_across_batches_and_forgotten_by_a_reset():
    tokens = TokenMeasurement(4, 2)
    assert tokens.ignored_tokens == 0 and tokens.num_tokens == 0
    tokens.update(torch.randn(1, 4, 2), torch.tensor([[0, I, I, 1]]))
    tokens.update(torch.randn(3, 2), torch.tensor([I, 2, I]))
    assert (tokens.ignored_tokens, tokens.num_tokens) == (4, 3)
    assert tokens.counts.tolist() == [1, 1, 1, 0]
    tokens.reset()
    assert (tokens.ignored_tokens, tokens.num_tokens) == (0, 0)
    assert tokens.counts.tolist() == [0, 0, 0, 0]
    tokens.update(torch.randn(2, 2), torch.tensor([I, 3]))
    assert (tokens.ignored_tokens, tokens.num_tokens) == (1, 1)


def test_the_second_pass_is_read_afresh_and_its_batches_checked(seed):
    """Past a zero NC4 budget, compute reads the batches again: the same result as with the
    features buffered; a callable gives a fresh iterable per call; a source that is not
    batches of pairs is refused in compute's name."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(4, 3, generator=gen)
    features = torch.randn(3, 8, 3, generator=gen) + 3 * torch.eye(4, 3)[torch.arange(24) % 4].view(
        3, 8, 3
    )
    labels = (torch.arange(24) % 4).view(3, 8)
    labels[:, 0] = I
    batches = [(features[b], labels[b]) for b in range(3)]
    buffered = TokenMeasurement(4, 3, head)
    streamed = TokenMeasurement(4, 3, head, memory_budget_bytes=0)
    for f, y in batches:
        buffered.update(f, y)
        streamed.update(f, y)
    assert streamed.measurement.needs_second_pass
    want = buffered.compute()
    assert streamed.compute(batches)["nc4_ncc_mismatch"] == want["nc4_ncc_mismatch"]
    assert streamed.compute(lambda: iter(batches))["nc4_ncc_mismatch"] == want["nc4_ncc_mismatch"]
    with raises_exactly(
        TypeError,
        "TokenMeasurement.compute: batches must be an iterable of (features, labels), got int",
    ):
        streamed.compute(7)
    with raises_exactly(
        ValueError,
        "TokenMeasurement.compute: each batch must be a (features, labels) pair, got tuple of "
        "length 3",
    ):
        streamed.compute([(features[0], labels[0], None)])


def test_a_second_pass_compute_passes_on_its_options():
    """compute(second_pass, ...) hands distributed, nc4 and on_degenerate to the measurement,
    as compute() without one does."""
    features = torch.eye(3)[:2].repeat(3, 1)
    labels = torch.arange(6) % 2
    streamed = TokenMeasurement(4, 3, torch.randn(4, 3), memory_budget_bytes=0)
    streamed.update(features, labels)
    batches = [(features, labels)]
    assert "nc4_ncc_mismatch" in streamed.compute(batches)
    assert "nc4_ncc_mismatch" not in streamed.compute(batches, nc4=False)
    with pytest.raises(RuntimeError, match="torch.distributed to be initialised"):
        streamed.compute(batches, distributed=True)
    one_class = TokenMeasurement(4, 3, torch.randn(4, 3), memory_budget_bytes=0)
    one_class.update(features, torch.zeros(6, dtype=torch.long))
    row = one_class.compute([(features, torch.zeros(6, dtype=torch.long))], on_degenerate="nan")
    assert row["nc_undefined"].startswith("1 of 4 classes had samples")


def test_next_token_labels_are_int64_whatever_the_ids_dtype():
    """int32 ids (some tokenizers' output) give int64 labels: the dtype of class indices, which
    holds any ignore_index."""
    ids = torch.tensor([[5, 6, 7]], dtype=torch.int32)
    labels = next_token_labels(ids, ignore_index=-(2**40))
    assert labels.dtype == torch.int64 and labels.tolist() == [[6, 7, -(2**40)]]


def test_the_statistics_live_on_the_device_asked_for():
    """device= reaches the statistics (the meta device stands for a GPU here: nothing is
    computed, the accumulators are placed)."""
    assert TokenMeasurement(4, 3, device="meta").stats.device == torch.device("meta")
    assert TokenMeasurement(4, 3).stats.device in (None, torch.device("cpu"))
