"""ncfast.integrations.torchmetrics.NeuralCollapse: the SPEC dict of ncfast.nc_metrics as a
torchmetrics Metric (alone, in a MetricCollection, after reset, merged, and synced across two gloo
processes by an exact all-reduce that leaves local state untouched)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ncfast
from ncfast.nc4 import NCCMismatch
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.synthetic_features import F64, make_data
from tests.helpers.tolerances import EPS, stream_tolerances

torchmetrics = pytest.importorskip("torchmetrics")
from ncfast.integrations.torchmetrics import NeuralCollapse  # noqa: E402

BATCH = 23


def linear_from(weight, bias) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def classifier_as(kind: str, weight, bias):
    return {
        "none": None,
        "linear": linear_from(weight, bias),
        "weight": weight,
        "pair": (weight, bias),
    }[kind]


def library_result(features, labels, num_classes, weight=None, bias=None, lam=0.0, parts=None):
    """ncfast.nc_metrics on ClassStats (and NC4 from NCCMismatch) fed the batches that
    :func:`feed` gives the Metric (``parts``: one feed per (features, labels) part)."""
    stats = ncfast.ClassStats(num_classes, features.shape[1])
    ncc = NCCMismatch(weight, bias) if weight is not None else None
    for part_features, part_labels in parts or [(features, labels)]:
        for start in range(0, len(part_labels), BATCH):
            batch = part_features[start : start + BATCH], part_labels[start : start + BATCH]
            stats.update(*batch)
            if ncc is not None:
                ncc.update(*batch)
    mismatch = None if ncc is None else ncc.compute(stats)
    return ncfast.nc_metrics(stats, weight, bias, lam, ncc_mismatch=mismatch)


def feed(metric, features, labels):
    for start in range(0, len(labels), BATCH):
        metric.update(features[start : start + BATCH], labels[start : start + BATCH])


def assert_same(got: dict, expected: dict, rtol: float, atol: float = 0.0):
    """Every key; ``rtol`` 0: bit for bit. Values of the Metric are float64 tensors."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert isinstance(got[key], torch.Tensor) and got[key].dtype == F64, key
        np.testing.assert_allclose(
            got[key].cpu().numpy(), np.asarray(value, dtype=np.float64), rtol, atol, err_msg=key
        )


@pytest.mark.parametrize("kind", ["none", "linear", "weight", "pair"])
def test_compute_equals_nc_metrics_on_the_same_batches(kind, seed):
    """The Metric runs the same operations on the same batches as ClassStats + nc_metrics, so
    its result is the library's, bit for bit (well inside the 1e-12 asked of it)."""
    features, labels, weight, bias = make_data([40, 0, 55, 31], 6, seed)
    metric = NeuralCollapse(4, 6, classifier_as(kind, weight, bias), weight_decay=0.2)
    feed(metric, features, labels)
    if kind == "weight":  # a weight without bias: the library's zero bias
        bias = torch.zeros_like(bias)
    if kind == "none":
        weight = bias = None
    expected = library_result(features, labels, 4, weight, bias, lam=0.2)
    got = metric.compute()
    assert_same(got, expected, rtol=0.0)
    assert ("nc4_ncc_mismatch" in got) == (kind != "none")
    assert got["nc1"].dim() == 0 and got["snr_singular_values"].dim() == 1
    assert int(got["classes_present"]) == 3


def test_reset_between_epochs_and_compute_again(seed):
    a, labels_a, weight, bias = make_data([30, 25, 35], 5, seed)
    b, labels_b, _, _ = make_data([20, 40, 30], 5, seed + 1)
    metric = NeuralCollapse(3, 5, (weight, bias))
    feed(metric, a, labels_a)
    first = metric.compute()
    assert_same(first, library_result(a, labels_a, 3, weight, bias), rtol=0.0)
    assert_same(metric.compute(), {k: v.numpy() for k, v in first.items()}, rtol=0.0)
    metric.reset()
    feed(metric, b, labels_b)
    assert_same(metric.compute(), library_result(b, labels_b, 3, weight, bias), rtol=0.0)
    # Without a reset, the next batches add to the pass (compute left the state as it was).
    feed(metric, a, labels_a)
    both = torch.cat([b, a]), torch.cat([labels_b, labels_a])
    expected = library_result(*both, 3, weight, bias, parts=[(b, labels_b), (a, labels_a)])
    assert_same(metric.compute(), expected, rtol=0.0)


def test_inside_a_metric_collection_with_reset(seed):
    """Two NeuralCollapse metrics (with and without the classifier) in one collection: each key
    comes back prefixed by its name, equal to the library's, epoch after epoch."""
    features, labels, weight, bias = make_data([33, 41, 29], 7, seed)
    collection = torchmetrics.MetricCollection(
        {
            "fc": NeuralCollapse(3, 7, linear_from(weight, bias)),
            "features": NeuralCollapse(3, 7),
        },
        prefix="val/",
    )
    for epoch in range(2):
        feed(collection, features[epoch:], labels[epoch:])
        got = collection.compute()
        with_fc = library_result(features[epoch:], labels[epoch:], 3, weight, bias)
        without = library_result(features[epoch:], labels[epoch:], 3)
        assert set(got) == {f"val/fc_{k}" for k in with_fc} | {f"val/features_{k}" for k in without}
        assert_same({k[7:]: v for k, v in got.items() if k.startswith("val/fc_")}, with_fc, 0.0)
        assert_same(
            {k[13:]: v for k, v in got.items() if k.startswith("val/features_")}, without, 0.0
        )
        collection.reset()


def test_merge_state_is_exact_near_collapse(seed):
    """Two metrics on two halves, merged, equal one stream: each half's shifts (first-batch
    class means) are re-expressed about the pooled means before the sums add."""
    features, labels, weight, bias = make_data([60, 70, 50], 6, seed, spread=1e-2, offset=10.0)
    whole = NeuralCollapse(3, 6, (weight, bias))
    feed(whole, features, labels)
    left, right = NeuralCollapse(3, 6, (weight, bias)), NeuralCollapse(3, 6, (weight, bias))
    feed(left, features[:77], labels[:77])
    feed(right, features[77:], labels[77:])
    left.merge_state(right)
    assert_states_agree(left, whole, features, labels)
    assert_same(left.compute(), {k: v.numpy() for k, v in whole.compute().items()}, rtol=1e-12)


def assert_states_agree(got: NeuralCollapse, expected: NeuralCollapse, features, labels):
    """Class means and Σ_W within :func:`stream_tolerances` (errors of size ‖h‖·spread, not
    ‖h‖²: the check that fails for a merge or sync that adds sums about different shifts)."""
    atol_means, atol_sigma = stream_tolerances(features, labels)
    a, b = got._stats(), expected._stats()
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.class_means, b.class_means, rtol=0, atol=atol_means)
    torch.testing.assert_close(a.sigma_w, b.sigma_w, rtol=0, atol=atol_sigma)


def test_nc4_past_the_budget_is_nan_with_a_warning_and_nc4_false_keeps_nothing(seed):
    features, labels, weight, bias = make_data([30, 30], 4, seed)
    small = NeuralCollapse(2, 4, (weight, bias), memory_budget_bytes=40 * 4 * 8)
    feed(small, features, labels)
    assert small.nc4_features == []
    with pytest.warns(RuntimeWarning, match="exceeded memory_budget_bytes=1280"):
        result = small.compute()
    assert torch.isnan(result["nc4_ncc_mismatch"])
    expected = library_result(features, labels, 2, weight, bias)
    del result["nc4_ncc_mismatch"], expected["nc4_ncc_mismatch"]
    assert_same(result, expected, rtol=0.0)
    small.reset()  # a new pass buffers again
    feed(small, features[:23], labels[:23])
    assert len(small.nc4_features) == 1
    lean = NeuralCollapse(2, 4, (weight, bias), nc4=False)
    feed(lean, features, labels)
    assert not hasattr(lean, "nc4_features") and "nc4_ncc_mismatch" not in lean.compute()


def test_forward_only_updates(seed):
    features, labels, weight, bias = make_data([30, 30], 4, seed)
    metric = NeuralCollapse(2, 4, (weight, bias))
    assert metric(features[:3], labels[:3]) is None  # one batch: no per-batch NC metrics
    feed(metric, features[3:], labels[3:])
    assert int(metric.compute()["num_samples"]) == 60


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_classes must be an integer ≥ 1"):
        NeuralCollapse(0, 3)
    with pytest.raises(ValueError, match=r"classifier weight must have shape .* \[3, 4\]"):
        NeuralCollapse(3, 4, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="classifier maps 5 features to 3 outputs"):
        NeuralCollapse(3, 4, nn.Linear(5, 3))
    with pytest.raises(TypeError, match="classifier must be None, an nn.Linear"):
        NeuralCollapse(3, 4, "fc")
    with pytest.raises(ValueError, match="weight_decay"):
        NeuralCollapse(3, 4, weight_decay=-1.0)
    with pytest.raises(ValueError, match="on_invalid"):
        NeuralCollapse(3, 4, on_invalid="ignore")
    metric = NeuralCollapse(3, 4)
    with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
        metric.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"move the metric with \.to\('meta'\)"):
        metric.update(
            torch.zeros(2, 4, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
        )
    with pytest.raises(ncfast.InvalidInputError, match="labels outside"):
        metric.update(torch.zeros(2, 4), torch.tensor([0, 3]))


def test_a_classifier_layer_is_read_at_compute_and_not_owned(seed):
    features, labels, weight, bias = make_data([30, 30, 30], 4, seed)
    layer = linear_from(weight, bias)
    metric = NeuralCollapse(3, 4, layer)
    assert list(metric.parameters()) == [] and "classifier_weight" not in metric.state_dict()
    feed(metric, features, labels)
    with torch.no_grad():
        layer.weight.mul_(2)
    expected = library_result(features, labels, 3, 2 * weight, bias)
    assert_same(metric.compute(), expected, rtol=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_after_to_equals_the_cpu_result(seed):
    features, labels, weight, bias = make_data([40, 55, 31], 6, seed, offset=100.0)
    on_cpu = NeuralCollapse(3, 6, (weight, bias))
    feed(on_cpu, features, labels)
    on_gpu = NeuralCollapse(3, 6, (weight, bias)).to("cuda")
    feed(on_gpu, features.cuda(), labels.cuda())
    got = on_gpu.compute()
    assert all(v.device.type == "cuda" for v in got.values())
    # The CUDA kernels sum in another order: two float64 streams of the same samples.
    assert_states_agree(on_gpu.cpu(), on_cpu, features, labels)
    assert_same(got, {k: v.numpy() for k, v in on_cpu.compute().items()}, rtol=1e-10)
    on_gpu.reset()
    assert on_gpu.counts.device.type == "cuda" and int(on_gpu.counts.sum()) == 0


# ---------------------------------------------------------------- two gloo processes
def _refuse_gather(*args, **kwargs):
    raise AssertionError("NeuralCollapse must all-reduce its states, not gather them")


def _sync_worker(rank, world, port, data, out_dir):
    features, labels, weight, bias = data
    with gloo_group(rank, world, port):
        dist.all_gather = dist.all_gather_object = _refuse_gather  # torchmetrics' default sync
        n = len(labels)
        # Unequal, interleaved shards; rank 1 never sees class 3.
        mine = torch.arange(n)[rank::world]
        if rank == 1:
            mine = mine[labels[mine] != 3]
        else:
            extra = torch.arange(n)[1::world]
            mine = torch.cat([mine, extra[labels[extra] == 3]])
        first, rest = mine[mine < n // 2], mine[mine >= n // 2]
        metric = NeuralCollapse(4, features.shape[1], (weight, bias), weight_decay=0.05)
        feed(metric, features[first], labels[first])
        local = {k: getattr(metric, k).clone() for k in ("counts", "shift", "sums", "scatter")}
        half = metric.compute()
        untouched = all(torch.equal(getattr(metric, k), v) for k, v in local.items())
        feed(metric, features[rest], labels[rest])  # training goes on after compute
        full = metric.compute()
        metric.reset()
        feed(metric, features[mine.flip(0)], labels[mine.flip(0)])
        again = metric.compute()
        torch.save(
            {"half": half, "full": full, "again": again, "untouched": untouched},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.mark.slow  # two spawned processes importing torch and torchmetrics: ~8 s on 2 cores
def test_two_gloo_processes_compute_what_one_process_computes(tmp_path, seed):
    """Near collapse (features of norm ~10, within-class spread 1e-2): each rank's compute()
    equals one process over all samples to 1e-12, compute leaves the local state untouched (so
    accumulation and the next epoch go on), and no state is gathered."""
    data = make_data([50, 70, 40, 60], 6, seed, spread=1e-2, offset=10.0)
    features, labels, weight, bias = data
    mp.spawn(_sync_worker, args=(2, free_port(), data, str(tmp_path)), nprocs=2, join=True)
    n = len(labels)
    half = NeuralCollapse(4, 6, (weight, bias), weight_decay=0.05)
    feed(half, features[: n // 2], labels[: n // 2])
    full = NeuralCollapse(4, 6, (weight, bias), weight_decay=0.05)
    feed(full, features, labels)
    expected = {"half": half.compute(), "full": full.compute()}
    expected["again"] = expected["full"]
    # The two sides sum the same samples in another order about other shifts. Each deviation
    # h − shift rounds by eps·‖h‖ against a spread of 1e-2 (‖h‖/spread ≈ 1e3): relative errors
    # of ~eps·1e3/√n per class statistic, 1e-14 and below in the metrics (measured: ≤ 2e-15),
    # so 1e-12 holds with room. It is sharp: statistics summed about no shift (Σ hhᵀ − Nμμᵀ)
    # lose eps·(‖h‖/spread)² ≈ 2e-10, and sums about different shifts are wrong outright.
    ratio = float(features.norm(dim=1).max()) / 1e-2
    assert EPS * ratio**2 > 100 * 1e-12
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["untouched"]
        for key in ("half", "full", "again"):
            want = {k: v.numpy() for k, v in expected[key].items()}
            assert_same(saved[key], want, rtol=1e-12, atol=100 * EPS)


# ----------------------------------------------------------------------- the example
def test_example_runs_with_its_defaults_and_shows_collapse(capsys):
    pytest.importorskip("sklearn")
    path = Path(__file__).resolve().parents[2] / "examples" / "torchmetrics_metric.py"
    spec = importlib.util.spec_from_file_location("torchmetrics_metric", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main([])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["epoch", "accuracy"]
    assert [int(line.split()[0]) for line in printed[1:]] == list(range(1, 21))
    for row in history:
        assert all(math.isfinite(v) for v in row.values())
        assert row["num_samples"] == 360 and row["classes_present"] == 10
    # Training on the digits collapses the held-out features (seed 0; the trend is large).
    assert history[-1]["nc1"] < 0.5 * history[0]["nc1"]
    assert history[-1]["nc4_ncc_mismatch"] < history[0]["nc4_ncc_mismatch"]
