"""The precision policy of the per-batch scatter product (docs/precision.md): ``fast`` within
its error bound of ``exact`` and of the float64 oracle, near collapse too; IEEE float32 whatever
torch's global flags say; the choice per device and its argument checks."""

from __future__ import annotations

import pytest
import torch

from ncfast.backend import ops, precision, reference
from ncfast.stats import ClassStats
from tests.helpers import oracle
from tests.helpers.native_checks import CUDA_SKIP, NATIVE_MISSING
from tests.helpers.synthetic_features import make_data
from tests.helpers.tolerances import U32, fast_scatter_bound, stream_tolerances

BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(bool(NATIVE_MISSING), reason=NATIVE_MISSING)),
]

# (class counts, P, batch rows, spread, offset, feature dtype): a plain case, one where the
# CPU update takes its panel path (≥ 512 rows), and near collapse (spread 1e-4 of the mean
# norm, means offset by 1e6).
CASES = {
    "plain": ([70, 50, 0, 80], 24, 64, 1.0, None, torch.float32),
    "panels": ([300, 260, 340], 96, 600, 1.0, None, torch.float32),
    "near_collapse": ([60, 90, 50, 100], 32, 128, 1e-4, 1e6, torch.float64),
}


def stream_state(features, labels, num_classes, batch_rows, fast, device="cpu"):
    state = reference.new_state(num_classes, features.shape[1], device)
    features, labels = features.to(device), labels.to(device)
    for start in range(0, len(labels), batch_rows):
        rows = slice(start, start + batch_rows)
        ops.update_stats_(features[rows], labels[rows], *state.values(), fast=fast)
    return state


def case_data(name, seed):
    counts, dim, batch_rows, spread, offset, dtype = CASES[name]
    features, labels, _, _ = make_data(
        counts, dim, seed, spread=spread, offset=offset, mean_scale=1.0
    )
    return features.to(dtype), labels, len(counts), batch_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_scatter_within_its_bound_of_exact(backend, case, seed):
    features, labels, num_classes, batch_rows = case_data(case, seed)
    with ops.use_backend(backend):
        exact = stream_state(features, labels, num_classes, batch_rows, fast=False)
        fast = stream_state(features, labels, num_classes, batch_rows, fast=True)
    # The centring is float64 in both policies: same shifts, sums and counts, bit for bit.
    for key in ("counts", "shift", "sums", "invalid"):
        assert torch.equal(exact[key], fast[key]), key
    centered = features.to(torch.float64) - exact["shift"][labels]
    bound = fast_scatter_bound(centered, batch_rows)
    error = (fast["scatter"] - exact["scatter"]).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    # Sharp and engaged: the product really is float32 (errors far above float64's), and the
    # bound is within ~√B·10 of the largest error, not vacuous.
    size = float(bound.max()) / U32
    assert float(error.max()) > 1e3 * torch.finfo(torch.float64).eps * size
    assert float((error / bound).max()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_sigma_w_near_collapse_within_bound_of_the_oracle(backend, seed):
    features, labels, num_classes, batch_rows = case_data("near_collapse", seed)
    with ops.use_backend(backend):
        state = stream_state(features, labels, num_classes, batch_rows, fast=True)
        _, sigma_w = reference.finalize_stats(
            state["counts"], state["shift"], state["sums"], state["scatter"]
        )
    truth = oracle.statistics(features.numpy(), labels.numpy(), num_classes)
    centered = features - torch.as_tensor(truth["means"])[labels]
    # The oracle's own float64 error and exact's, plus fast's (its Σ_W is S / N).
    _, float64_tol = stream_tolerances(features, labels, against_brute_force=True)
    bound = fast_scatter_bound(centered, batch_rows) / len(labels) + float64_tol
    error = (sigma_w - torch.as_tensor(truth["sigma_w"])).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    # Relative to Σ_W itself (≈ spread²), not to the means' size (≈ 1e12).
    assert float(error.max()) < 1e-4 * float(torch.as_tensor(truth["sigma_w"]).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_is_ieee_float32_whatever_the_global_flags(backend, seed):
    features, labels, num_classes, batch_rows = case_data("panels", seed)
    flags = torch.backends.mkldnn.matmul
    saved = flags.fp32_precision
    with ops.use_backend(backend):
        plain = stream_state(features, labels, num_classes, batch_rows, fast=True)
        try:
            flags.fp32_precision = "bf16"  # oneDNN's reduced-precision float32 GEMM
            reduced = stream_state(features, labels, num_classes, batch_rows, fast=True)
            assert flags.fp32_precision == "bf16"  # restored after each update
        finally:
            flags.fp32_precision = saved
    assert torch.equal(plain["scatter"], reduced["scatter"])


@pytest.mark.cuda
@pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_on_cuda_is_never_tf32(backend, seed):
    """With torch's TF32 matmuls on, the fast product stays IEEE float32: identical to the
    product with TF32 off, and within the float32 bound (TF32's u = 2⁻¹¹ would break it)."""
    features, labels, num_classes, batch_rows = case_data("panels", seed)
    flags = torch.backends.cuda.matmul
    saved = flags.fp32_precision
    with ops.use_backend(backend):
        exact = stream_state(features, labels, num_classes, batch_rows, False, "cuda")
        plain = stream_state(features, labels, num_classes, batch_rows, True, "cuda")
        try:
            flags.fp32_precision = "tf32"
            tf32 = stream_state(features, labels, num_classes, batch_rows, True, "cuda")
            assert flags.fp32_precision == "tf32"
        finally:
            flags.fp32_precision = saved
    centered = features.to(torch.float64) - exact["shift"].cpu()[labels]
    bound = fast_scatter_bound(centered, batch_rows)
    for state in (plain, tf32):
        error = (state["scatter"].cpu() - exact["scatter"].cpu()).abs()
        assert bool((error <= bound).all()), float((error / bound).max())
    # Same float32 operands and GEMM: equal up to cuBLAS's choice of reduction order.
    assert torch.allclose(plain["scatter"], tf32["scatter"], rtol=0, atol=float(bound.max()))


def test_exact_is_the_default_op_and_float64(seed):
    features, labels, num_classes, batch_rows = case_data("plain", seed)
    default = reference.new_state(num_classes, features.shape[1])
    for start in range(0, len(labels), batch_rows):
        rows = slice(start, start + batch_rows)
        ops.update_stats_(features[rows], labels[rows], *default.values())
    exact = stream_state(features, labels, num_classes, batch_rows, fast=False)
    for key in default:
        assert torch.equal(default[key], exact[key]), key


def test_class_stats_precision_argument(seed):
    features, labels, num_classes, _ = case_data("plain", seed)
    with pytest.raises(ValueError, match="precision must be one of exact, fast, auto"):
        ClassStats(num_classes, features.shape[1], precision="float32")
    auto = ClassStats(num_classes, features.shape[1])
    assert auto.resolved_precision is None  # no state, no device yet
    auto.update(features, labels)
    assert auto.resolved_precision == precision.auto_precision("cpu")[0] == precision.CPU_AUTO
    fast = ClassStats(num_classes, features.shape[1], precision="fast")
    fast.update(features, labels)
    assert fast.resolved_precision == "fast"
    exact = ClassStats(num_classes, features.shape[1], precision="exact")
    exact.update(features, labels)
    assert exact.resolved_precision == "exact"
    assert not torch.equal(fast.sigma_w, exact.sigma_w)  # the policy reaches the op


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "exact"), ((8, 0), "exact"), ((10, 0), "exact"), ((8, 9), "fast"), ((7, 5), "fast")],
)
def test_auto_precision_per_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    precision._auto_precision.cache_clear()
    try:
        policy, why = precision.auto_precision(torch.device("cuda", 0))
    finally:
        precision._auto_precision.cache_clear()
    assert policy == expected
    assert f"{capability[0]}.{capability[1]}" in why


def test_train_option_reaches_the_measurement_and_is_checked():
    from ncfast.paper.config import TrainConfig

    config = TrainConfig.from_preset("demo", stats_precision="fast").resolved()
    assert config.measure_options()["stats_precision"] == "fast"
    assert TrainConfig.from_preset("demo").resolved().stats_precision == "auto"
    with pytest.raises(ValueError, match="stats_precision: precision must be one of"):
        TrainConfig.from_preset("demo", stats_precision="fp16").resolved()


def test_info_shows_what_auto_picks_per_device():
    from ncfast.backend.build_info import build_info

    entries = build_info()["stats_precision"]
    assert entries[0] == {
        "device": "cpu",
        "auto": precision.CPU_AUTO,
        "why": precision.auto_precision("cpu")[1],
    }
    assert len(entries) == 1 + torch.cuda.device_count()


def test_analyze_checks_its_precision_option_first(tmp_path):
    from ncfast.paper.analyze import analyze

    with pytest.raises(ValueError, match="analyze: precision must be one of exact, fast, auto"):
        analyze(tmp_path / "missing.pt", stats_precision="half")
