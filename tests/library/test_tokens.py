"""Token-level measurement (ncfast.tokens): [B, T, P] features, ignored positions, next-token
labels, a vocabulary far larger than the classes present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ncfast
from ncfast.stats import InvalidInputError
from ncfast.tokens import TokenMeasurement, next_token_labels, token_rows
from tests.helpers import oracle
from tests.helpers.assertions import assert_matches_oracle, assert_same_metrics
from tests.helpers.synthetic_features import make_data
from tests.helpers.tolerances import oracle_rtol

IGNORE = -100


def as_sequences(features, labels, seq_len, g, ignored_fraction=0.2):
    """``[N, P]`` rows laid out as ``[B, T, P]`` sequences with ignored positions inserted
    (their features garbage: huge, NaN, inf) and the kept rows' order unchanged."""
    n, p = features.shape
    total = int(n / (1 - ignored_fraction)) + seq_len
    total -= total % seq_len
    kept_slots = torch.sort(torch.randperm(total, generator=g)[:n]).values
    seq_labels = torch.full((total,), IGNORE, dtype=torch.int64)
    seq_labels[kept_slots] = labels
    seq_features = torch.full((total, p), 1e300, dtype=features.dtype)
    seq_features[::3] = float("nan")
    seq_features[1::7] = float("inf")
    seq_features[kept_slots] = features
    return seq_features.view(-1, seq_len, p), seq_labels.view(-1, seq_len)


def fed_tokens(tokens, features, labels, batch):
    for start in range(0, len(labels), batch):
        tokens.update(features[start : start + batch], labels[start : start + batch])
    return tokens


def test_next_token_labels_shift_and_both_paddings():
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    expected = torch.tensor(
        [[6, 7, 8, IGNORE], [IGNORE, IGNORE, 4, IGNORE], [2, IGNORE, IGNORE, IGNORE]]
    )
    assert torch.equal(next_token_labels(ids, mask), expected)
    assert torch.equal(next_token_labels(ids)[:, :-1], ids[:, 1:])
    # Hugging Face labels (unshifted, -100 off the loss): shifted, their -100 kept.
    hf = torch.tensor([[5, 6, IGNORE, 8]])
    assert torch.equal(next_token_labels(hf), torch.tensor([[6, IGNORE, 8, IGNORE]]))
    assert torch.equal(next_token_labels(ids, ignore_index=-1)[:, -1], torch.full((3,), -1))


def test_token_path_equals_classification_path_on_flattened_features(seed):
    counts = [30, 55, 0, 41, 18, 60, 25]
    features, labels, weight, bias = make_data(counts, 6, seed)
    g = torch.Generator().manual_seed(seed)
    seq_features, seq_labels = as_sequences(features, labels, 9, g)
    tokens = fed_tokens(TokenMeasurement(7, 6, weight, bias), seq_features, seq_labels, 5)
    result = tokens.compute()
    # The classification path fed the same rows in one batch: other batching, same samples.
    whole = ncfast.Measurement(7, 6, weight, bias)
    whole.update(features, labels)
    rtol = oracle_rtol(features, labels, 7)
    assert_same_metrics(result, whole.compute(), rtol=rtol)
    assert tokens.num_tokens == len(labels) and result["classes_present"] == 6
    assert tokens.ignored_tokens == int((seq_labels == IGNORE).sum())
    assert torch.equal(tokens.counts, torch.tensor(counts))
    expected = oracle.nc_metrics(features.numpy(), labels.numpy(), 7, weight, bias)
    assert_matches_oracle(result, expected, rtol)


def test_ignored_positions_change_nothing_and_are_not_invalid(seed):
    features, labels, weight, bias = make_data([20, 35, 28], 4, seed)
    g = torch.Generator().manual_seed(seed)
    seq_features, seq_labels = as_sequences(features, labels, 8, g, ignored_fraction=0.5)
    # The same kept rows with the same batch boundaries, without ignored positions: bit for bit.
    kept = seq_labels != IGNORE
    plain = ncfast.Measurement(3, 4, weight, bias)
    for batch_features, batch_labels in zip(
        seq_features.split(4), seq_labels.split(4), strict=True
    ):
        keep = batch_labels != IGNORE
        plain.update(batch_features[keep], batch_labels[keep])
    tokens = TokenMeasurement(3, 4, weight, bias, on_invalid="skip")
    fed_tokens(tokens, seq_features, seq_labels, 4)
    assert_same_metrics(tokens.compute(), plain.compute())
    assert tokens.stats.skipped == {"label_out_of_range": 0, "non_finite": 0}
    assert tokens.ignored_tokens == int((~kept).sum()) > 0
    rows, row_labels = token_rows(seq_features, seq_labels)
    assert torch.equal(rows, features) and torch.equal(row_labels, labels)


def test_second_pass_when_the_buffer_overflows(seed):
    features, labels, weight, bias = make_data([40, 30, 50], 5, seed)
    g = torch.Generator().manual_seed(seed)
    seq_features, seq_labels = as_sequences(features, labels, 6, g)
    buffered = fed_tokens(TokenMeasurement(3, 5, weight, bias), seq_features, seq_labels, 4)
    streamed = fed_tokens(
        TokenMeasurement(3, 5, weight, bias, memory_budget_bytes=0), seq_features, seq_labels, 4
    )
    assert streamed.measurement.needs_second_pass
    with pytest.raises(ValueError, match="second pass"):
        streamed.compute()
    batches = list(zip(seq_features.split(4), seq_labels.split(4), strict=True))
    expected = buffered.compute()["nc4_ncc_mismatch"]
    # The same samples counted against the same means: the same integer count.
    assert streamed.compute(second_pass=batches)["nc4_ncc_mismatch"] == expected
    assert streamed.compute(second_pass=lambda: iter(batches))["nc4_ncc_mismatch"] == expected


def test_vocabulary_scale_equals_brute_force_on_the_present_classes(seed):
    """GPT-2's vocabulary, a few hundred tokens present: accumulators sized by the vocabulary,
    metrics over the present classes (SPEC §1) equal the brute force on those classes alone."""
    vocab, dim, present = 50_257, 8, 200
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(2, 7, (present,), generator=g).tolist()
    features, compact, small_weight, _ = make_data(counts, dim, seed)
    token_ids = torch.randperm(vocab, generator=g)[:present]
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    weight[token_ids] = small_weight
    seq_features, seq_labels = as_sequences(features, token_ids[compact], 16, g)
    tokens = fed_tokens(TokenMeasurement(vocab, dim, weight), seq_features, seq_labels, 16)
    result = tokens.compute()
    assert tokens.stats.state_dict()["sums"].shape == (vocab, dim)
    assert result["classes_present"] == present and result["num_samples"] == len(compact)
    assert torch.equal(tokens.counts[token_ids], torch.tensor(counts))
    assert int(tokens.counts.sum()) == len(compact)
    expected = oracle.nc_metrics(features.numpy(), compact.numpy(), present, small_weight)
    keys = [
        "nc1",
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_equinorm_classifiers",
        "nc2_equiangular_classifiers",
        "nc2_maxangle_classifiers",
        "nc3_self_duality",
        "snr_condition",
    ]
    assert_matches_oracle(result, expected, oracle_rtol(features, compact, present), keys)
    # NC4 brute force: the head's argmax over the whole vocabulary, the nearest mean over the
    # present tokens' means.
    x = features.numpy()
    means = np.stack([x[compact.numpy() == k].mean(0) for k in range(present)])
    nearest = token_ids.numpy()[((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    decided = (x @ weight.numpy().T).argmax(1)
    assert result["nc4_ncc_mismatch"] == np.mean(decided != nearest)


def test_labels_outside_the_vocabulary_are_named():
    tokens = TokenMeasurement(10, 3)
    labels = torch.tensor([[1, 2, 12, IGNORE]])
    with pytest.raises(InvalidInputError, match=r"labels must be token ids in \[0, vocab_size=10"):
        tokens.update(torch.randn(1, 4, 3), labels)
    with pytest.raises(InvalidInputError, match="e.g. -3"):
        tokens.update(torch.randn(1, 2, 3), torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="ignore_index=5 is a token id"):
        TokenMeasurement(10, 3, ignore_index=5)
    with pytest.raises(ValueError, match=r"labels \[2, 3\]"):
        tokens.update(torch.randn(2, 4, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer"):
        tokens.update(torch.randn(2, 4, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of the shape"):
        next_token_labels(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))
