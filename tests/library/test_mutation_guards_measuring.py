"""Guards of the measuring layers that a mutant used to survive (issue 21, items 5-7 and 10): the
online watch's NC4 reference across a window with no valid sample and its restore without the
window, the torchmetrics merge past the NC4 buffer budget, the Lightning callback with two
validation dataloaders, and both sides of each threshold of the degenerate-features rule
(SPEC §2) with unbalanced classes. Each test fails when its check is removed (see
bench/results/mutation.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ncfast
from ncfast.monitor import NCMonitor
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import documented_bound


# ------------------------------------------------------------------- 5. the online watch
class LinearNet(nn.Module):
    """float64 features = a linear map of the input (NaN inputs give NaN features)."""

    def __init__(self, seed: int, inputs: int = 6, dim: int = 5, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(inputs, dim).double()
        self.classifier = nn.Linear(dim, classes).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def batch_of(seed: int, n: int = 30, inputs: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = 1.5 * torch.randn(classes, inputs, generator=g, dtype=F64)
    return centers[labels] + torch.randn(n, inputs, generator=g, dtype=F64), labels


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return torch.stack([features[labels == c].mean(0) for c in range(classes)])


def ncc_mismatch(model: LinearNet, x: torch.Tensor, reference_means: torch.Tensor) -> float:
    """The fraction of samples of ``x`` whose classifier argmax is not their nearest
    reference mean (SPEC §2's NC4 against given means)."""
    with torch.no_grad():
        features = model.body(x)
        decision = model.classifier(features).argmax(1)
    nearest = torch.cdist(features, reference_means).argmin(1)
    return int((decision != nearest).sum()) / len(x)


def fed_step(watch, model, x, y):
    watch.labels(y)
    model(x)
    return watch.step()


def test_a_window_of_skipped_rows_keeps_the_previous_nc4_reference(seed):
    """Windows of one step: valid, all rows non-finite (skipped: no sample), valid. The third
    window's NC4 is against the first window's class means: the empty one changed nothing."""
    model = LinearNet(seed)
    watch = NCMonitor(model, model.classifier, on_invalid="skip").watch_training(every=1)
    x1, y1 = batch_of(seed)
    x3, y3 = batch_of(seed + 1)
    first = fed_step(watch, model, x1, y1)
    empty = fed_step(watch, model, torch.full_like(x1, math.nan), y1)
    third = fed_step(watch, model, x3, y3)
    watch.close()
    assert "nc4_ncc_mismatch" not in first and empty["num_samples"] == 0
    with torch.no_grad():
        reference = class_means(model.body(x1), y1)
    expected = ncc_mismatch(model, x3, reference)
    assert third["nc4_ncc_mismatch"] == expected  # a count over 30 samples: exact
    # The reference is the first window's, not the third's own means (the counts against the
    # two can coincide by chance on 30 samples, e.g. seed 1372050092, so the means are compared).
    with torch.no_grad():
        own = class_means(model.body(x3), y3)
    assert not torch.allclose(own, reference)


def test_a_restore_without_the_window_starts_an_empty_window(seed):
    """``load_state_dict(state, window=False)`` (the ranks other than the first under DDP):
    the step count and the previous means are restored, the window in progress is empty,
    whatever the watch held before (here: the same state restored with its window)."""
    model = LinearNet(seed)
    watch = NCMonitor(model, model.classifier).watch_training(every=2)
    (xa, ya), (xb, yb), (xc, yc) = (batch_of(seed + k) for k in range(3))
    assert fed_step(watch, model, xa, ya) is None
    assert fed_step(watch, model, xb, yb) is not None  # window 1: a and b
    assert fed_step(watch, model, xc, yc) is None  # half of window 2
    state = watch.state_dict()
    watch.close()
    resumed = NCMonitor(model, model.classifier).watch_training(every=2)
    resumed.load_state_dict(state)  # with the window: holds c and c's NC4 counts
    resumed.load_state_dict(state, window=False)
    xd, yd = batch_of(seed + 3, n=21)
    row = fed_step(resumed, model, xd, yd)
    resumed.close()
    assert row["step"] == 4 and row["window_steps"] == 2
    assert row["num_samples"] == 21  # d only
    with torch.no_grad():
        reference = class_means(model.body(torch.cat([xa, xb])), torch.cat([ya, yb]))
    assert row["nc4_ncc_mismatch"] == ncc_mismatch(model, xd, reference)


# ------------------------------------------------------------ 6. torchmetrics merging
torchmetrics = pytest.importorskip("torchmetrics")
from ncfast.integrations.torchmetrics import NeuralCollapse  # noqa: E402


def metric_of(features, labels, weight, bias, budget: int) -> NeuralCollapse:
    metric = NeuralCollapse(2, 4, (weight, bias), memory_budget_bytes=budget)
    metric.update(features, labels)
    return metric


# Budgets (bytes) of (own, incoming) metrics holding 40 and 20 samples of 4 float64 features
# (1280 and 640 bytes): the incoming metric past its budget, the own one past its budget (the
# incoming buffer alone would fit it: only the flag tells), or each within it and the merged
# buffer (1920) past it.
MERGE_BUDGETS = {"incoming": (4000, 600), "own": (1200, 4000), "together": (1300, 1300)}


@pytest.mark.parametrize("dropped_side", sorted(MERGE_BUDGETS))
def test_a_merge_past_the_nc4_budget_is_nan_with_a_warning(seed, dropped_side):
    """A metric past its NC4 budget merged into one within it, the reverse, or two within it
    whose merged buffer is not: NaN with the warning, as the metric alone gives; two whose
    merged buffer fits keep the exact NC4 of all samples."""
    features, labels, weight, bias = make_data([30, 30], 4, seed)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(seed))
    features, labels = features[order], labels[order]
    own_part, incoming_part = (features[:40], labels[:40]), (features[40:], labels[40:])
    own_budget, incoming_budget = MERGE_BUDGETS[dropped_side]
    own = metric_of(*own_part, weight, bias, own_budget)
    own.merge_state(metric_of(*incoming_part, weight, bias, incoming_budget))
    assert own.nc4_features == []  # the buffer is dropped, not kept to no purpose
    with pytest.warns(RuntimeWarning, match="exceeded memory_budget_bytes"):
        result = own.compute()
    assert torch.isnan(result["nc4_ncc_mismatch"])
    # The other side: a merged buffer within the budget keeps NC4 of all 60 samples.
    fits = metric_of(*own_part, weight, bias, 1920)
    fits.merge_state(metric_of(*incoming_part, weight, bias, 1920))
    whole = ncfast.Measurement(2, 4, weight, bias)
    whole.update(features, labels)
    assert float(fits.compute()["nc4_ncc_mismatch"]) == whole.compute()["nc4_ncc_mismatch"]


# ----------------------------------------------------- 7. Lightning, two val dataloaders
def test_lightning_measures_only_the_chosen_validation_dataloader(seed):
    pytest.importorskip("sklearn")
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader

    from ncfast.integrations.lightning import NeuralCollapseCallback
    from tests.helpers.assertions import assert_same_metrics
    from tests.helpers.lightning_example import example, trainer

    class TwoLoaderMLP(example.DigitsMLP):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx)

    lightning.seed_everything(seed, verbose=False)
    train, val = example.digits(seed)
    cut = len(val) // 3
    parts = [
        torch.utils.data.Subset(val, range(cut)),
        torch.utils.data.Subset(val, range(cut, len(val))),
    ]
    callbacks = [NeuralCollapseCallback("classifier", dataloader_idx=k) for k in (0, 1)]
    model = TwoLoaderMLP(0.1, 5e-4)
    trainer(callbacks, 1).fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        [DataLoader(part, batch_size=64) for part in parts],
    )
    for callback, part in zip(callbacks, parts, strict=True):
        expected = NCMonitor(model, model.classifier).evaluate(DataLoader(part, batch_size=64))
        assert callback.metrics["num_samples"] == len(part)
        assert_same_metrics(callback.metrics, expected)


# ------------------------------------------------- 10. the degenerate-features rule
COUNTS = (1000, 10, 10)  # unbalanced: the bound grows with the largest class


def unbalanced_features(separations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of COUNTS samples at (s_c, 1, ±1) in coordinates (e1, e2, e3) plus
    ``separations[c]`` (a [3, 2] block in e1, e4): every sample of a class has the same e1/e4
    coordinates, so the class means there are exact; the ±1 in e3 (even counts: exact mean
    0) gives Σ_W a trace of 1, which the small classes weigh by N/n_c = 102 in the bound."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    features = torch.zeros(len(labels), 4, dtype=F64)
    features[:, 1] = 1.0
    features[:, 2] = 1.0 - 2.0 * (torch.arange(len(labels)) % 2).double()
    features[:, [0, 3]] = separations[labels]
    return features, labels


def centered_singular_values(separations: torch.Tensor) -> torch.Tensor:
    """σ(M̄) of classes at ``separations`` with priors COUNTS/N."""
    priors = torch.tensor(COUNTS, dtype=F64) / sum(COUNTS)
    centered = separations - priors @ separations
    return torch.linalg.svdvals(centered)


def measured(features, labels):
    stats = ncfast.ClassStats(3, features.shape[1])
    for start in range(0, len(labels), 97):
        stats.update(features[start : start + 97], labels[start : start + 97])
    return ncfast.nc_metrics(stats)


def scaled_to(shape: torch.Tensor, sigma_max: float) -> torch.Tensor:
    return shape * (sigma_max / float(centered_singular_values(shape)[0]))


@pytest.mark.parametrize(("factor", "degenerate"), [(1.1, False), (0.9, True)])
def test_unbalanced_classes_on_both_sides_of_the_bound(backend, factor, degenerate):
    """Rank-1 M̄ (classes apart along e1 only) at 1.1 and 0.9 times the bound: the bound uses
    the largest class (γ of 2002 terms, not 22) and the small classes' share of Σ_W."""
    shape = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-0.5, 0.0]], dtype=F64)
    features, labels = unbalanced_features(shape)
    bound = documented_bound(features, labels, 3)
    features, labels = unbalanced_features(scaled_to(shape, factor * bound))
    assert documented_bound(features, labels, 3) == pytest.approx(bound, rel=1e-9)
    if degenerate:
        with pytest.raises(ncfast.DegenerateFeaturesError, match="do not separate"):
            measured(features, labels)
    else:
        assert measured(features, labels)["sigma_b_rank"] == 1


@pytest.mark.parametrize(("factor", "degenerate"), [(1.05, False), (0.95, True)])
def test_a_spectrum_between_the_bound_and_its_root_rank_multiple(backend, factor, degenerate):
    """σ_max at 1.05 and 0.95 times the bound, with a second singular value of 0.6 σ_max:
    ‖M̄‖_F is above the bound in both cases and below √2·bound, so σ_max decides (computed),
    not the Frobenius norm."""
    shape = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.6]], dtype=F64)
    sigma = centered_singular_values(shape)
    assert 0.4 < float(sigma[1] / sigma[0]) < 0.8  # ‖M̄‖_F/σ_max in (1/0.95, √2/1.05)
    features, labels = unbalanced_features(shape)
    bound = documented_bound(features, labels, 3)
    features, labels = unbalanced_features(scaled_to(shape, factor * bound))
    frobenius = float(centered_singular_values(scaled_to(shape, factor * bound)).norm())
    assert bound < frobenius < math.sqrt(2) * bound
    if degenerate:
        with pytest.raises(ncfast.DegenerateFeaturesError, match="do not separate"):
            measured(features, labels)
    else:  # measured; its second direction (0.6·1.05 of the bound) does not count
        assert measured(features, labels)["sigma_b_rank"] == 1


@pytest.mark.parametrize(("factor", "rank"), [(10.0, 2), (0.1, 1)])
def test_a_large_offset_counts_a_low_variance_direction_only_above_the_bound(
    backend, seed, factor, rank
):
    """Features of norm ~1e6, classes 1 apart along e1 (within-class spread 0.1) and
    ``factor``·bound apart along e2, where the within-class spread is tiny (1e-9; none in e3,
    whose sampling noise would separate the small classes' means for real): the means'
    rounding in e2 is far above SPEC's rtol·max σ, so only the bound keeps a separation below
    it out of Σ_B's rank (Σ_W⁻¹ would blow that noise up in NC1), and one above it counts."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    noise = torch.randn(len(labels), 3, generator=g, dtype=F64) * torch.tensor([0.1, 1e-9, 0.0])
    offset = torch.full((3,), 1e6 / math.sqrt(3), dtype=F64)

    def features_at(apart: float) -> torch.Tensor:
        means = torch.tensor([[0.0, 0.0, 0.0], [1.0, apart, 0.0], [0.5, -apart, 0.0]], dtype=F64)
        return offset + means[labels] + noise

    bound = documented_bound(features_at(0.0), labels, 3)
    assert 1e-10 * 1.0 < 0.1 * bound  # rtol·max σ(M̄) is below both cases
    features = features_at(factor * bound)
    order = torch.randperm(len(labels), generator=g)
    result = measured(features[order], labels[order])
    assert result["sigma_b_rank"] == rank
    assert math.isfinite(result["nc1"])
