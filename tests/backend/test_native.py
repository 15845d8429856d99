"""The compiled ops of ncfast._C against the pure-torch reference and float64 numpy, on the CPU
always and on CUDA when a GPU and CUDA kernels are present (skipped with the reason otherwise).

The extension missing makes these tests skip, unless NCFAST_REQUIRE_EXTENSION=1 (CI), which
turns that into a failure.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncfast.backend import ops, reference
from ncfast.backend.reference import STATE_KEYS, new_state
from tests.helpers import exact, oracle
from tests.helpers.native_checks import (
    CUDA_SKIP,
    NATIVE_MISSING,
    assert_state_matches,
    finalized,
    make_batch,
    native_backend,
    ncc_numpy,
    update,
    valid_rows,
)

if NATIVE_MISSING and os.environ.get("NCFAST_REQUIRE_EXTENSION") == "1":
    raise RuntimeError(f"NCFAST_REQUIRE_EXTENSION=1 but {NATIVE_MISSING}")
pytestmark = pytest.mark.skipif(bool(NATIVE_MISSING), reason=NATIVE_MISSING or "built")


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)]
    ),
]
FEATURE_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


# ---------------------------------------------------------------------------- update
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("layout", [0, 1, 2])
def test_update_matches_reference_and_numpy(device, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = 7, 19
    label_dtype = LABEL_DTYPES[seed % len(LABEL_DTYPES)]
    native, ref = new_state(num_classes, dim, device), new_state(num_classes, dim)
    seen_f, seen_y = [], []
    expected_invalid = torch.zeros(2, dtype=torch.int64)
    for batch in (37, 64, 5, 80):
        x, y = make_batch(batch, dim, num_classes, dtype, label_dtype, g, device, layout=layout)
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x.cpu(), y.cpu())
        label_ok = (y.cpu().long() >= 0) & (y.cpu().long() < num_classes)
        finite = torch.isfinite(x.cpu().double()).all(dim=1)
        expected_invalid += torch.stack([(~label_ok).sum(), (label_ok & ~finite).sum()])
        keep = label_ok & finite
        seen_f.append(x.cpu()[keep].double())
        seen_y.append(y.cpu()[keep].long())
    assert torch.equal(native["invalid"].cpu(), expected_invalid)
    assert_state_matches(native, ref)
    if device == "cpu":  # same algorithm as the reference: the state itself agrees
        assert torch.equal(native["shift"], ref["shift"])
        torch.testing.assert_close(native["sums"], ref["sums"], rtol=0, atol=1e-10)
    h, y = torch.cat(seen_f).numpy(), torch.cat(seen_y).numpy()
    expected = oracle.statistics(h, y, num_classes)
    means, sigma_w = reference.finalize_stats(
        *(native[k].cpu() for k in ("counts", "shift", "sums", "scatter"))
    )
    present = expected["present"]
    np.testing.assert_allclose(means.numpy()[present], expected["means"][present], rtol=1e-12)
    np.testing.assert_allclose(
        sigma_w.numpy(), expected["sigma_w"], rtol=0, atol=1e-12 * expected["sigma_w"].max()
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_update_reads_every_label_dtype(device, label_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    native, ref = new_state(5, 4, device), new_state(5, 4)
    x, y = make_batch(50, 4, 5, torch.float32, label_dtype, g, device)
    y = y[::2]  # non-contiguous labels
    x = x[::2]
    update(native_backend.update_stats_, native, x, y)
    update(reference.update_stats_, ref, x.cpu(), y.cpu())
    assert_state_matches(native, ref)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    dim=st.integers(1, 40),
    num_classes=st.integers(1, 12),
    dtype=st.sampled_from(FEATURE_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_update_random_shapes_match_reference(batches, dim, num_classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    native, ref = new_state(num_classes, dim), new_state(num_classes, dim)
    for batch in batches:
        x, y = make_batch(batch, dim, num_classes, dtype, torch.int64, g, "cpu", layout=seed % 3)
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x, y)
    assert_state_matches(native, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_is_a_no_op(device, seed):
    g = torch.Generator().manual_seed(seed)
    state = new_state(4, 6, device)
    update(
        native_backend.update_stats_,
        state,
        *make_batch(30, 6, 4, torch.float32, torch.int64, g, device),
    )
    before = {k: v.clone() for k, v in state.items()}
    for dtype in FEATURE_DTYPES:
        empty = torch.empty(0, 6, dtype=dtype, device=device)
        update(
            native_backend.update_stats_,
            state,
            empty,
            torch.empty(0, dtype=torch.int64, device=device),
        )
    for k in STATE_KEYS:
        assert torch.equal(state[k], before[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_invalid_only_counts_them(device, seed):
    state = new_state(3, 5, device)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)).to(device)
    x[:3, 0] = float("nan")
    y = torch.tensor([0, 1, 2, 3, -4, 7], device=device)
    update(native_backend.update_stats_, state, x, y)
    assert state["invalid"].tolist() == [3, 3]
    assert state["counts"].sum().item() == 0
    assert not state["scatter"].any() and not state["sums"].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes, dim", [(1, 9), (60, 3)], ids=["single_class", "C_gt_P"])
def test_single_class_and_more_classes_than_features(device, num_classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    native, ref = new_state(num_classes, dim, device), new_state(num_classes, dim)
    for batch in (40, 200, 33):
        x, y = make_batch(batch, dim, num_classes, torch.float32, torch.int64, g, device)
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x.cpu(), y.cpu())
    assert_state_matches(native, ref)


def _near_collapse_data(seed, num_classes=4, dim=8, per_class=150):
    """Class means of norm 1e4 offset by a common vector of norm 1e6, spread 1e-2, float64."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    common = common / common.norm() * 1e6
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * 1e4 + common
    labels = torch.arange(num_classes).repeat(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    features = means[labels] + 1e-2 * torch.randn(
        len(labels), dim, generator=g, dtype=torch.float64
    )
    return features, labels


@pytest.mark.parametrize("device", DEVICES)
def test_update_stays_exact_near_collapse(device, seed):
    """A naive Σ hhᵀ − N μμᵀ would lose everything here (1e12 vs 1e-4); shifted accumulation
    keeps Σ_W to ~1e-12 relative of the exact (rational) statistics, on every platform."""
    features, labels = _near_collapse_data(seed)
    state = new_state(4, 8, device)
    for chunk in torch.split(torch.arange(len(labels)), 97):
        update(
            native_backend.update_stats_,
            state,
            features[chunk].to(device),
            labels[chunk].to(device),
        )
    means, scatter = finalized(state)
    exp_means, exp_scatter = exact.class_statistics(features.numpy(), labels.numpy(), 4)
    # mean = shift + sums/n with the shift within the spread (1e-2) of the mean: one rounding of
    # the sum (eps/2 relative) plus the sums' accumulation error, n·eps·Σ|z|/n ≈ 150·eps·0.05
    # absolute; rtol 1e-15 (≈ 4.5 eps) and atol 1e-15 cover both with margin.
    np.testing.assert_allclose(means.numpy(), exp_means, rtol=1e-15, atol=1e-15)
    # N Σ_W from the centered rows: sums of N = 600 products of size spread², N·eps relative
    # (≈ 1.3e-13); 1e-11 leaves a factor ~75.
    err = np.abs(scatter.numpy() - exp_scatter).max() / np.abs(exp_scatter).max()
    assert err < 1e-11, err


@pytest.mark.parametrize("mode", ["full", "panels", None])
def test_gram_panels_and_full_product_agree(monkeypatch, mode, seed):
    """The upper-triangle panel scheme (with its mirror) and the plain product give the same
    scatter (NCFAST_GRAM forces either; unset, batches of 512 rows or more take the panels)."""
    g = torch.Generator().manual_seed(seed)
    if mode is None:
        monkeypatch.delenv("NCFAST_GRAM", raising=False)
    else:
        monkeypatch.setenv("NCFAST_GRAM", mode)
    native, ref = new_state(6, 150, "cpu"), new_state(6, 150)
    eps = torch.finfo(torch.float64).eps
    asymmetry_bound = torch.zeros(150, 150, dtype=torch.float64)
    for batch in (600, 70):
        x, y = make_batch(batch, 150, 6, torch.float32, torch.int64, g, "cpu")
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x, y)
        scatter = native["scatter"]
        if (mode or ("panels" if batch >= 512 else "full")) == "panels":
            # The panels fill the upper triangle and the mirror copies it: exactly symmetric.
            assert torch.equal(scatter, scatter.T)
            asymmetry_bound.zero_()
        else:
            # A plain dgemm sums S_ab and S_ba separately, each within n·eps·Σ_i |z_ia z_ib| of
            # the exact value, plus one rounding each of the addition to the state.
            valid = valid_rows(x, y, 6)
            shift = native["shift"][y.long().clamp(0, 5)]
            z_bound = (x.double().abs() + shift.abs()).nan_to_num(0.0) * valid[:, None]
            asymmetry_bound += 2 * batch * eps * (z_bound.T @ z_bound) + 2 * eps * scatter.abs()
            assert ((scatter - scatter.T).abs() <= asymmetry_bound).all()
    torch.testing.assert_close(native["scatter"], ref["scatter"], rtol=1e-13, atol=1e-10)


def test_update_with_noncontiguous_state_writes_back(seed):
    g = torch.Generator().manual_seed(seed)
    ref = new_state(3, 5)
    state = {k: v.clone() for k, v in new_state(3, 5).items()}
    state["scatter"] = torch.zeros(5, 5, dtype=torch.float64).t()  # transposed view
    state["shift"] = torch.zeros(5, 3, dtype=torch.float64).t()
    x, y = make_batch(40, 5, 3, torch.float32, torch.int64, g, "cpu")
    update(native_backend.update_stats_, state, x, y)
    update(reference.update_stats_, ref, x, y)
    assert_state_matches(state, ref)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels must be an integer"),
        (lambda a: a.update(features=a["features"].long()), TypeError, "features must be float"),
        (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels must have shape"),
        (lambda a: a.update(scatter=a["scatter"][:-1]), ValueError, "scatter must have shape"),
        (lambda a: a.update(counts=a["counts"].int()), TypeError, "counts must be Long"),
        (lambda a: a.update(features=a["features"][0]), ValueError, r"features must be \[B, P\]"),
    ],
)
def test_update_rejects_bad_arguments_by_name(mutate, error, match):
    args = {"features": torch.ones(8, 4), "labels": torch.zeros(8, dtype=torch.int64)}
    args.update(new_state(3, 4))
    mutate(args)
    with pytest.raises(error, match=match):
        torch.ops.ncfast.update_stats_(
            args["features"], args["labels"], *(args[k] for k in STATE_KEYS)
        )


# ------------------------------------------------------------------------------- NC4
def _ncc_case(g, batch, dim, num_classes, dtype, device, layout=0):
    x, y = make_batch(batch, dim, num_classes, dtype, torch.int64, g, "cpu", layout=layout)
    valid = valid_rows(x, y, num_classes)
    valid[::5] = False
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    present = torch.rand(num_classes, generator=g) > 0.2
    present[0] = True
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    args = (x, valid, weight, bias, means, present)
    return tuple(a.to(device) for a in args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_ncc_mismatch_matches_reference_and_numpy(device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for batch, dim, num_classes, layout in ((90, 12, 6, 0), (41, 5, 30, 1), (1, 3, 2, 2)):
        args = _ncc_case(g, batch, dim, num_classes, dtype, device, layout)
        got = native_backend.ncc_mismatch_count(*args)
        assert got.device.type == device and got.dtype == torch.int64 and got.dim() == 0
        expected = reference.ncc_mismatch_count(*(a.cpu() for a in args))
        assert int(got) == int(expected) == ncc_numpy(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_ncc_mismatch_empty_batch_and_all_invalid(device, seed):
    g = torch.Generator().manual_seed(seed)
    x, valid, w, b, m, present = _ncc_case(g, 20, 4, 3, torch.float32, device)
    assert int(native_backend.ncc_mismatch_count(x[:0], valid[:0], w, b, m, present)) == 0
    assert int(native_backend.ncc_mismatch_count(x, torch.zeros_like(valid), w, b, m, present)) == 0


# ---------------------------------------------------------------- op registration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_update_stats(device, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(24, 6, 3, torch.float32, torch.int64, g, device)
    state = new_state(3, 6, device)
    torch.library.opcheck(
        torch.ops.ncfast.update_stats_.default, (x, y, *(state[k] for k in STATE_KEYS))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_ncc_mismatch_count(device, seed):
    g = torch.Generator().manual_seed(seed)
    torch.library.opcheck(
        torch.ops.ncfast.ncc_mismatch_count.default, _ncc_case(g, 30, 5, 4, torch.float32, device)
    )


def _alias_free(schema) -> list[tuple[str, str, object, bool]]:
    """(name, type, default, written) of each argument: the schema less its alias set names,
    which infer_schema numbers differently (a2! for a!)."""
    return [
        (a.name, str(a.type), a.default_value, bool(a.alias_info and a.alias_info.is_write))
        for a in schema.arguments
    ]


@pytest.mark.parametrize("name", ["update_stats_", "ncc_mismatch_count"])
def test_each_op_signature_is_the_reference_signature(name):
    """The signature is written in the C++ schema and in the reference only (the wrappers,
    the dispatch and the fake derive theirs): torch's own schema inference from the
    reference's annotations must give the registered schema, argument for argument, with the
    same arguments written in place (those the reference's docstring says it updates)."""
    registered = getattr(torch.ops.ncfast, name).default._schema
    written = [a.name for a in registered.arguments if a.alias_info and a.alias_info.is_write]
    # unwrap: under mutmut each function is a trampoline defined in mutmut's module, whose
    # globals cannot resolve the reference's (string) annotations.
    inferred = torch._C.parse_schema(
        f"ncfast::{name}"
        + torch.library.infer_schema(inspect.unwrap(getattr(reference, name)), mutates_args=written)
    )
    assert _alias_free(inferred) == _alias_free(registered)
    assert [str(r.type) for r in inferred.returns] == [str(r.type) for r in registered.returns]
    for module in (ops, native_backend):  # derived: the same parameters as the reference
        assert inspect.signature(getattr(module, name)) == inspect.signature(
            getattr(reference, name)
        )


def test_native_op_takes_keywords_and_refuses_unknown_ones(seed):
    """The wrapper orders keyword arguments as the schema does, defaults included."""
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(24, 6, 3, torch.float32, torch.int64, g, "cpu")
    by_keyword, by_position = new_state(3, 6), new_state(3, 6)
    native_backend.update_stats_(features=x, labels=y, **by_keyword)
    native_backend.update_stats_(x, y, *(by_position[k] for k in STATE_KEYS), False)
    assert_state_matches(by_keyword, by_position)
    with pytest.raises(TypeError, match=r"unexpected arguments \['fastest'\]"):
        native_backend.update_stats_(x, y, *(by_position[k] for k in STATE_KEYS), fastest=True)


@pytest.mark.skipif(
    "MUTANT_UNDER_TEST" in os.environ,
    reason="under mutmut every function is a trampoline that sets a ContextVar, which "
    "torch.compile cannot trace",
)
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_update_under_torch_compile_fullgraph(backend, seed):
    """The update traces as one mutating op (fake kernel, functionalisation) and gives the
    eager result."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend=backend)
    def step(features, labels, counts, shift, sums, scatter, invalid):
        native_backend.update_stats_(features * 2, labels, counts, shift, sums, scatter, invalid)
        return scatter.diagonal().sum()

    g = torch.Generator().manual_seed(seed)
    compiled, eager = new_state(3, 6), new_state(3, 6)
    for _ in range(2):
        x, y = make_batch(20, 6, 3, torch.float32, torch.int64, g, "cpu", bad=False)
        trace = step(x, y, *(compiled[k] for k in STATE_KEYS))
        update(native_backend.update_stats_, eager, x * 2, y)
    for k in STATE_KEYS:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(trace, eager["scatter"].diagonal().sum())


# ------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)
def test_cuda_update_never_synchronises_with_the_host(seed):
    g = torch.Generator().manual_seed(seed)
    state = new_state(10, 64, "cuda")
    x, y = make_batch(300, 64, 10, torch.bfloat16, torch.int64, g, "cuda")
    native_backend.update_stats_(x, y, *(state[k] for k in STATE_KEYS))  # warm-up (allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            native_backend.update_stats_(x, y, *(state[k] for k in STATE_KEYS))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(state["counts"].sum()) == 4 * int(valid_rows(x.cpu(), y.cpu(), 10).sum())


@pytest.mark.cuda
@pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP)
@pytest.mark.parametrize("mode", ["full", "panels"])
def test_cuda_large_batch_both_gram_schemes(monkeypatch, mode, seed):
    """A large batch (9000 rows; the CUDA default would take the plain product at P = 256,
    csrc/cuda/ops_cuda.cpp, cuda_panel_min_rows), each scheme forced."""
    monkeypatch.setenv("NCFAST_GRAM", mode)
    g = torch.Generator().manual_seed(seed)
    native, ref = new_state(10, 256, "cuda"), new_state(10, 256)
    x, y = make_batch(9000, 256, 10, torch.float32, torch.int64, g, "cuda")
    update(native_backend.update_stats_, native, x, y)
    update(reference.update_stats_, ref, x.cpu(), y.cpu())
    if mode == "panels":
        assert torch.equal(native["scatter"], native["scatter"].T)
    assert_state_matches(native, ref, rtol=1e-11)


# ------------------------------------------------------------------- backend wiring
def test_use_backend_switches_the_ops_and_restores_them(monkeypatch):
    """ops.use_backend (the `backend` fixture of tests/conftest.py) routes every compiled op to
    the named backend inside the block and restores the previous one after it, also after an
    error."""
    calls = []
    for name, module in (("reference", reference), ("native", native_backend)):
        monkeypatch.setattr(module, "ncc_mismatch_count", lambda *args, n=name: calls.append(n))
    args = (torch.eye(3),) * 6
    before = ops.BACKEND
    for name in ("reference", "native"):
        with ops.use_backend(name):
            assert ops.BACKEND == name
            ops.ncc_mismatch_count(*args)
    with pytest.raises(ZeroDivisionError), ops.use_backend("reference"):
        ops.ncc_mismatch_count(*args)
        raise ZeroDivisionError
    assert ops.BACKEND == before
    ops.ncc_mismatch_count(*args)
    assert calls == ["reference", "native", "reference", before]
    with pytest.raises(ValueError, match="use_backend: name must be one of reference, native"):
        with ops.use_backend("cuda"):
            pass


def test_ops_uses_native_unless_told_otherwise():
    if os.environ.get("NCFAST_BACKEND", "") in ("", "native"):
        assert ops.BACKEND == "native"
        assert ops.NATIVE_UNAVAILABLE_REASON == ""


def test_extension_built_for_another_torch_or_cuda_is_refused_loudly(monkeypatch):
    """check_build runs at import: another torch major.minor or CUDA major version is a
    RuntimeError (not a quiet fallback)."""
    native_backend.check_build()  # this build matches
    monkeypatch.setattr(native_backend, "COMPILED_TORCH_VERSION", "1.13.1")
    with pytest.raises(RuntimeError, match=r"compiled against torch 1\.13\.1"):
        native_backend.check_build()
    monkeypatch.setattr(native_backend, "COMPILED_TORCH_VERSION", torch.__version__)
    monkeypatch.setattr(native_backend, "WITH_CUDA", True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(native_backend, "COMPILED_CUDA_VERSION", "12.8")
    with pytest.raises(RuntimeError, match=r"compiled with CUDA 12\.8 .* major versions must"):
        native_backend.check_build()
    # Within a CUDA major version the runtime is compatible (torch's own rule): accepted.
    monkeypatch.setattr(native_backend, "COMPILED_CUDA_VERSION", "13.2")
    native_backend.check_build()


def _run_python(code: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_package_works_on_the_reference_when_the_extension_cannot_load():
    """A build without a compiler has no ncfast._C: ncfast falls back and says why."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ncfast._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, ncfast\n"
        "from ncfast.backend import ops\n"
        "s = ncfast.ClassStats(3, 4)\n"
        "s.update(torch.randn(30, 4), torch.arange(30) % 3)\n"
        "print(ops.BACKEND, '|', ops.NATIVE_UNAVAILABLE_REASON, '|', s.num_samples)\n"
    )
    backend, reason, n = (part.strip() for part in _run_python(code).split("|"))
    assert backend == "reference" and "blocked for the test" in reason and n == "30"


def test_info_command_reports_the_build():
    from click.testing import CliRunner

    from ncfast.cli import main

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "native extension: present" in text
    assert f"torch: {torch.__version__}" in text
    assert "active backend:" in text
    cuda_line = (
        "CUDA kernels: compiled" if native_backend.WITH_CUDA else "CUDA kernels: not compiled"
    )
    assert cuda_line in text
    as_json = CliRunner().invoke(main, ["info", "--json"])
    assert as_json.exit_code == 0 and '"extension": true' in as_json.output
