"""The CUDA kernels' own source (csrc/cuda/*.cu), compiled for the CPU against an emulation of
the CUDA execution model (tests/backend/cuda_emulation/), against the reference.

Runs everywhere a C++20 compiler is (no GPU needed), so the logic of the CUDA update and NC4
kernels — per-row validation, the list of the batch's classes built from the first arrival of
each, class ranking within a row tile, run sums, first-seen shifts spread over the row tiles,
the Gram mirror, argmin/argmax reductions with ties, the refusal of a kernel image the driver
cannot load and of an error left by an earlier operation — is tested in CI. Blocks run in a
shuffled order, four at a time (their atomics and hand-overs race for real), and each block's
shared memory starts as garbage (a missing initialisation gives wrong numbers). The GPU's
weaker memory model is outside what this can show (the CUDA tests in
tests/backend/test_native.py and tests/backend/test_native_cuda.py, and bench/gpu_check.sh's
compute-sanitizer passes, cover the real thing on a GPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths

from ncfast.backend import reference
from tests.helpers import exact

ROOT = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
SOURCES = [
    EMULATION / "cuda_emulator.cpp",
    EMULATION / "cuda_emulation.h",
    ROOT / "csrc" / "cuda" / "update_stats.cu",
    ROOT / "csrc" / "cuda" / "ncc_mismatch.cu",
    ROOT / "csrc" / "cuda" / "device_common.cuh",
    ROOT / "csrc" / "cuda" / "kernels.h",
    ROOT / "csrc" / "common.h",
]
SCRATCH_FIELDS = (
    "num_batch_classes", "batch_counts", "first_row_inv", "is_new", "batch_classes", "row_class",
    "tile_order",
)  # fmt: skip
ROWS_PER_TILE = 128  # kRowsPerTile, csrc/cuda/kernels.h
FEATURE_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
LABEL_KIND = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}
I64, PTR, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def _build() -> ctypes.CDLL:
    if not all(p.exists() for p in SOURCES):
        pytest.skip("csrc/ is not next to the tests (installed package without sources)")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"ncfast_cuda_emulator_{digest}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"]
        cmd += [f"-I{p}" for p in include_paths()] + [f"-I{ROOT}"]
        cmd += [str(SOURCES[0]), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"building the CUDA emulation failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.ncfast_emu_last_error.restype = ctypes.c_char_p
    lib.ncfast_emu_update_scratch_bytes.restype = I64
    lib.ncfast_emu_update_scratch_bytes.argtypes = [I64, I64, I64, ctypes.POINTER(I64)]
    lib.ncfast_emu_update_scratch_offsets.argtypes = [I64, I64, ctypes.POINTER(I64)]
    lib.ncfast_emu_update_stats.argtypes = [PTR, INT, I64, I64, PTR, INT, I64, I64, I64, I64]
    lib.ncfast_emu_update_stats.argtypes += [PTR] * 6
    lib.ncfast_emu_mirror.argtypes = [PTR, I64]
    lib.ncfast_emu_ncc_center.argtypes = [PTR, INT, I64, I64, PTR, I64, PTR, I64, I64, PTR]
    lib.ncfast_emu_ncc_count.argtypes = [PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, PTR]
    lib.ncfast_emu_seed.argtypes = [ctypes.c_uint]
    lib.ncfast_emu_fail_load.argtypes = [INT]
    lib.ncfast_emu_set_pending_error.argtypes = [INT]
    return lib


@pytest.fixture(scope="module")
def emu() -> ctypes.CDLL:
    return _build()


def _check(lib, rc):
    assert rc == 0, lib.ncfast_emu_last_error().decode()


def scratch_fields(lib, scratch, batch, num_classes) -> dict[str, torch.Tensor]:
    """The int32 fields of an update's scratch (csrc/cuda/kernels.h, UpdateScratch), as views."""
    offsets = (I64 * len(SCRATCH_FIELDS))()
    lib.ncfast_emu_update_scratch_offsets(batch, num_classes, offsets)
    sizes = {"num_batch_classes": 1, "row_class": batch, "tile_order": batch}
    return {
        name: scratch[offset : offset + 4 * sizes.get(name, num_classes)].view(torch.int32)
        for name, offset in zip(SCRATCH_FIELDS, offsets, strict=True)
    }


def emulated_update(lib, features, labels, counts, shift, sums, scatter, invalid):
    """update_stats_cuda (csrc/cuda/ops_cuda.cpp) with the kernels emulated: the same scratch
    layout and zeroing, then scatter += zᵀz. Returns the centered rows z and the scratch fields
    (None for an empty batch)."""
    b, p = features.shape
    c = counts.shape[0]
    if b == 0:
        return None, None
    zeroed = I64()
    total = lib.ncfast_emu_update_scratch_bytes(b, p, c, ctypes.byref(zeroed))
    scratch = torch.full((total,), 0xAB, dtype=torch.uint8)  # poison what is not zeroed
    scratch[: zeroed.value] = 0
    centered = torch.full((b, p), float("nan"), dtype=torch.float64)  # every element is written
    rc = lib.ncfast_emu_update_stats(
        features.data_ptr(), FEATURE_KIND[features.dtype], features.stride(0), features.stride(1),
        labels.data_ptr(), LABEL_KIND[labels.dtype], labels.stride(0), b, p, c,
        counts.data_ptr(), shift.data_ptr(), sums.data_ptr(), invalid.data_ptr(),
        scratch.data_ptr(), centered.data_ptr(),
    )  # fmt: skip
    _check(lib, rc)
    scatter.addmm_(centered.T, centered)
    return centered, scratch_fields(lib, scratch, b, c)


def new_state(num_classes, dim):
    """The CPU accumulator state as a list in the order the ops take it."""
    state = reference.new_state(num_classes, dim)
    return [state[k] for k in reference.STATE_KEYS]


def make_batch(g, batch, dim, num_classes, dtype, label_dtype, layout, classes=None):
    classes = num_classes if classes is None else classes
    labels = torch.randint(0, classes, (batch,), generator=g)
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    features = means[labels] + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if batch > 4:
        labels[1] = num_classes + 2
        if label_dtype.is_signed:
            labels[2] = -3
        features[4, dim - 1] = float("nan")
    features = features.to(dtype)
    if layout == 1:
        features = features.t().contiguous().t()
    elif layout == 2:
        features = torch.cat([features, features], dim=1)[:, ::2]
    return features, labels.to(label_dtype)


@pytest.mark.parametrize("dtype", list(FEATURE_KIND))
def test_emulated_update_kernels_match_reference(emu, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    label_dtype = list(LABEL_KIND)[seed % len(LABEL_KIND)]
    num_classes, dim = 9, 45  # two column tiles, the second partial
    native, ref = new_state(num_classes, dim), new_state(num_classes, dim)
    # Classes 0-1, then 0-3, then all: first-seen classes in one-tile and in several-tile
    # batches (300 rows span several row tiles of both kernels).
    for batch, classes, layout in ((7, 2, 2), (130, 4, 0), (300, None, 1), (64, None, 0)):
        x, y = make_batch(g, batch, dim, num_classes, dtype, label_dtype, layout, classes)
        counts_before = native[0].clone()
        z, _ = emulated_update(emu, x, y, *native)
        reference.update_stats_(x, y, *ref)
        label_ok = (y.long() >= 0) & (y.long() < num_classes)
        valid = label_ok & torch.isfinite(x.double()).all(dim=1)
        assert not z[~valid].any(), "invalid rows must be zero in the centered buffer"
        for k in range(num_classes):  # first seen: the shift is the first valid sample
            rows = torch.nonzero(valid & (y.long() == k)).flatten()
            if counts_before[k] == 0 and rows.numel():
                assert torch.equal(native[1][k], x[rows[0]].double()), (seed, k)
    assert torch.equal(native[0], ref[0]) and torch.equal(native[4], ref[4])
    means, sigma_w = reference.finalize_stats(*native[:4])
    ref_means, ref_sigma_w = reference.finalize_stats(*ref[:4])
    torch.testing.assert_close(means, ref_means, rtol=1e-12, atol=1e-12)
    scale = float(ref_sigma_w.abs().max())
    torch.testing.assert_close(sigma_w, ref_sigma_w, rtol=0, atol=1e-12 * scale)


def test_emulated_update_many_classes_and_single_class(emu, seed):
    """More classes than the threads of the second kernel's blocks (the list walk strides over
    blocks) and C = 1."""
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    for num_classes, dim, batch in ((600, 3, 200), (1, 33, 150)):
        native, ref = new_state(num_classes, dim), new_state(num_classes, dim)
        for _ in range(2):
            x, y = make_batch(g, batch, dim, num_classes, torch.float32, torch.int64, 0)
            emulated_update(emu, x, y, *native)
            reference.update_stats_(x, y, *ref)
        assert torch.equal(native[0], ref[0]) and torch.equal(native[4], ref[4])
        got, expected = reference.finalize_stats(*native[:4]), reference.finalize_stats(*ref[:4])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_emulated_update_near_collapse_is_exact(emu, seed):
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    common = torch.randn(6, generator=g, dtype=torch.float64)
    means = torch.randn(3, 6, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * 1e4 + common / common.norm() * 1e6
    labels = torch.randint(0, 3, (400,), generator=g)
    features = means[labels] + 1e-2 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    native = new_state(3, 6)
    for chunk in torch.split(torch.arange(400), 150):
        emulated_update(emu, features[chunk], labels[chunk], *native)
    _, sigma_w = reference.finalize_stats(*native[:4])
    _, exact_scatter = exact.class_statistics(features.numpy(), labels.numpy(), 3)
    exact_sigma_w = exact_scatter / 400
    err = np.abs(sigma_w.numpy() - exact_sigma_w).max() / np.abs(exact_sigma_w).max()
    # Rows centered on a shift within the class spread: the error is that of summing
    # ~n products of size spread² (n·eps relative, n = 400 → ~1e-13), not of 1e12 − 1e12.
    assert err < 1e-11, err


def _classes_of(labels, valid) -> torch.Tensor:
    return torch.unique(labels.long()[valid]).to(torch.int32)


@pytest.mark.parametrize("num_classes", [9, 1300])
def test_emulated_list_of_the_batch_classes_and_first_seen_shifts(emu, seed, num_classes):
    """Kernel 1 lists each class of the batch once (the row whose count's atomicAdd returned 0
    appends it; arrival order), kernel 2 flags those first seen, kernel 3 sets the shifts of
    exactly those. Batches with every class new, with none new, and with some new (more than
    the blocks of one wave, so the appends race)."""
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    dim = 37  # two column tiles
    state = new_state(num_classes, dim)
    every_class = torch.cat([torch.arange(num_classes), torch.randint(0, num_classes, (5,))])
    every_class = every_class[torch.randperm(len(every_class), generator=g)]
    half = torch.arange(0, num_classes, 2)
    rest = torch.arange(1, num_classes, 2)
    cases = [
        ("all new", every_class, None),
        ("some new", half, None),
        ("none new", half.flip(0), half),
        ("rest new", torch.cat([rest, half[:3]]), half),
    ]
    for case, labels, seen in cases:
        if case == "some new":
            state = new_state(num_classes, dim)
        x = torch.randn(len(labels), dim, generator=g, dtype=torch.float64) + 3
        counts_before, shift_before = state[0].clone(), state[1].clone()
        _, fields = emulated_update(emu, x, labels, *state)
        in_batch = _classes_of(labels, torch.ones_like(labels).bool())
        listed = fields["batch_classes"][: int(fields["num_batch_classes"])]
        assert torch.equal(listed.sort().values, in_batch), case  # each once, no other
        new = in_batch[counts_before[in_batch.long()] == 0]
        assert torch.equal(
            fields["is_new"][in_batch.long()].bool(), counts_before[in_batch.long()] == 0
        )
        changed = torch.nonzero((state[1] != shift_before).any(dim=1)).flatten().to(torch.int32)
        assert torch.equal(changed, new), case
        assert seen is None or not torch.isin(new, seen.to(torch.int32)).any()
        assert torch.equal(state[0] - counts_before, torch.bincount(labels, minlength=num_classes))


def test_emulated_row_tiles_are_ranked_by_class_once(emu, seed):
    """tile_order: within each tile of 128 rows, the tile-local row indices in stable class
    order, invalid rows last (the order the centering kernel walks for every column tile)."""
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    num_classes, batch = 5, 300  # two full tiles and a partial one
    x, y = make_batch(g, batch, 3, num_classes, torch.float32, torch.int64, 0)
    _, fields = emulated_update(emu, x, y, *new_state(num_classes, 3))
    valid = (y >= 0) & (y < num_classes) & torch.isfinite(x).all(dim=1)
    key = torch.where(valid, y, num_classes)  # invalid rows sort last
    for row0 in range(0, batch, ROWS_PER_TILE):
        tile_key = key[row0 : row0 + ROWS_PER_TILE]
        expected = torch.sort(tile_key, stable=True).indices.to(torch.int32)
        got = fields["tile_order"][row0 : row0 + ROWS_PER_TILE]
        assert torch.equal(got, expected), row0


@pytest.mark.parametrize("p", [1, 31, 33, 70])
def test_emulated_mirror_copies_upper_onto_lower(emu, p, seed):
    m = torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    upper = m.triu().clone()
    _check(emu, emu.ncfast_emu_mirror(m.data_ptr(), p))
    assert torch.equal(m.triu(), upper)
    assert torch.equal(m, m.T)


def _emulated_ncc_count(lib, near, logits, sq_norms, bias, present, valid) -> int:
    count = torch.zeros((), dtype=torch.int64)
    batch, num_classes = near.shape
    _check(
        lib,
        lib.ncfast_emu_ncc_count(
            near.data_ptr(), logits.data_ptr(), sq_norms.data_ptr(), bias.data_ptr(),
            present.data_ptr(), valid.data_ptr(), valid.stride(0), batch, num_classes,
            count.data_ptr(),
        ),
    )  # fmt: skip
    return int(count)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_emulated_ncc_kernels_match_reference(emu, dtype, seed):
    """ncc_mismatch_count_cuda's plan and GEMMs in torch, its two kernels emulated, against
    the reference."""
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    batch, dim, num_classes = 150, 7, 40  # more classes than lanes
    x, y = make_batch(g, batch, dim, num_classes, dtype, torch.int64, 2)
    valid = (y >= 0) & (y < num_classes) & torch.isfinite(x.double()).all(dim=1)
    valid[::7] = False
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    present = torch.rand(num_classes, generator=g) > 0.3
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)

    mask = present.double()
    center = (means * mask[:, None]).sum(0) / mask.sum()
    mu = means - center
    centered = torch.full((batch, dim), float("nan"), dtype=torch.float64)
    _check(
        emu,
        emu.ncfast_emu_ncc_center(
            x.data_ptr(), FEATURE_KIND[dtype], x.stride(0), x.stride(1), valid.data_ptr(),
            valid.stride(0), center.data_ptr(), batch, dim, centered.data_ptr(),
        ),
    )  # fmt: skip
    expected_centered = torch.where(valid[:, None], x.double() - center, 0.0)
    assert torch.equal(centered, expected_centered)
    near = (centered @ mu.T).contiguous()
    logits = (centered @ weight.T).contiguous()
    sq_norms = mu.square().sum(1)
    folded_bias = bias + weight @ center
    count = _emulated_ncc_count(emu, near, logits, sq_norms, folded_bias, present, valid)
    assert count == int(reference.ncc_mismatch_count(x, valid, weight, bias, means, present))


def test_emulated_ncc_count_breaks_ties_and_nan_as_torch(emu, seed):
    """The count kernel's warp reductions against torch's argmin/argmax on the very same
    scores: exact ties go to the lowest index (ties are set in the score arrays themselves; a
    tie made through duplicated classifier rows need not survive a GEMM bitwise), NaN counts as
    the extreme value, absent classes never win the nearest-mean side."""
    g = torch.Generator().manual_seed(seed)
    emu.ncfast_emu_seed(seed % 1000)
    batch, num_classes = 96, 70  # three class chunks per lane

    def dyadic(*shape):  # multiples of 2^-10 below 2^4: every sum and difference is exact
        return torch.round(torch.randn(*shape, generator=g, dtype=torch.float64) * 1024) / 1024

    near, logits = dyadic(batch, num_classes), dyadic(batch, num_classes)
    sq_norms, bias = dyadic(num_classes).abs(), dyadic(num_classes)
    present = torch.rand(num_classes, generator=g) > 0.3
    present[[3, 7, 40]] = True
    present[10] = False
    cols = torch.randint(11, num_classes, (batch, 2), generator=g).sort(dim=1).values
    cols[1::4] = torch.tensor([3, 40])  # rows where 3 and 40 tie on both sides
    cols[3::4] = torch.tensor([10, 60])  # rows where absent class 10 leads the logits ...
    rows = torch.arange(batch)
    top = (logits + bias).max(dim=1).values + 1  # columns a < b tie above all others
    logits[rows, cols[:, 0]] = top - bias[cols[:, 0]]
    logits[rows, cols[:, 1]] = top - bias[cols[:, 1]]
    near[:, 40] = near[:, 3] + (sq_norms[40] - sq_norms[3]) / 2  # distances of 3 and 40 tie
    near[1::4, 3] += 16.0  # and lead in those rows
    near[1::4, 40] += 16.0
    logits[2::4, 7] = float("nan")  # rows where NaN wins the argmax ...
    near[2::4, 7] += 16.0  # ... where class 7 is the nearest mean
    near[3::4, 10] += 16.0  # ... and would be the nearest mean if it were present
    valid = torch.rand(batch, generator=g) > 0.2
    got = _emulated_ncc_count(emu, near, logits, sq_norms, bias, present, valid)
    distance = torch.where(present, sq_norms - 2 * near, float("inf"))
    score = logits + bias
    assert (score[rows, cols[:, 0]] == score[rows, cols[:, 1]]).all()  # the ties are exact
    assert (distance[1::4, 3] == distance[1::4, 40]).all()
    assert (distance[1::4].argmin(dim=1) == 3).all() and (distance[2::4].argmin(dim=1) == 7).all()
    expected = ((distance.argmin(dim=1) != score.argmax(dim=1)) & valid).sum()
    assert got == int(expected)


def _snapshot(state):
    return [t.clone() for t in state]


@pytest.mark.parametrize("error", [222, 209])  # PTX newer than the driver; no image for the GPU
def test_emulated_kernel_that_cannot_load_fails_before_anything_runs(emu, seed, error):
    """A kernel image the driver cannot load (or PTX it cannot JIT-compile) is found before the
    first launch: the op fails with the message native.py falls back on, and the state is as
    it was (so the reference can take the batch)."""
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(g, 70, 5, 4, torch.float32, torch.int64, 0)
    state = new_state(4, 5)
    emulated_update(emu, x, y, *state)
    before = _snapshot(state)
    emu.ncfast_emu_fail_load(error)
    try:
        with pytest.raises(AssertionError, match=r"^ncfast: no usable kernel image for update_st"):
            emulated_update(emu, x, y, *state)
        # NC4's launcher checks before its first kernel too (it throws before reading anything)
        with pytest.raises(AssertionError, match=r"^ncfast: no usable kernel image for ncc_mis"):
            _check(emu, emu.ncfast_emu_ncc_center(None, 2, 1, 1, None, 1, None, 1, 1, None))
    finally:
        emu.ncfast_emu_fail_load(0)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_emulated_error_left_by_an_earlier_operation_is_not_blamed_on_a_kernel(emu, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(g, 70, 5, 4, torch.float32, torch.int64, 0)
    state = new_state(4, 5)
    before = _snapshot(state)
    emu.ncfast_emu_set_pending_error(719)
    with pytest.raises(
        AssertionError,
        match="pending before the launch of classify_rows_kernel, left by an earlier",
    ):
        emulated_update(emu, x, y, *state)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))
    emulated_update(emu, x, y, *state)  # the error was reported once, and cleared
    assert int(state[0].sum()) > 0
