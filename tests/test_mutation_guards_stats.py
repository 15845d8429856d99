"""Guards of ncfast/stats.py that mutmut found missing (issue 21): each test fails on the
surviving mutants that bench/results/mutation.md lists with it (checked by running the mutant)."""

from __future__ import annotations

import math

import pytest
import torch

from ncfast.stats import ClassStats, InvalidInputError
from tests.synthetic_features import F64


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
