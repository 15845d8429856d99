"""The CUDA kernels on a GPU, where the CPU tests and the emulation cannot reach: inputs made on
the device (strided views of device tensors), shapes past one warp or one block, the default
Gram scheme, a non-default stream, CUDA graph capture, a batch of more than 2^31 elements, and
deterministic mode. Each result is checked against the float64 reference
(ncfast.backend.reference on
float64 copies, which computes in float64 whatever the input dtype).

Skipped without a CUDA device and CUDA kernels; bench/gpu_check.sh fails when they skip there.
"""

from __future__ import annotations

import pytest
import torch

from ncfast import ClassStats
from ncfast.backend import reference
from ncfast.backend.reference import STATE_KEYS, new_state
from tests.helpers.feeding import stats_from
from tests.helpers.native_checks import (
    CUDA_SKIP,
    assert_state_matches,
    make_batch,
    native_backend,
    ncc_numpy,
    update,
    valid_rows,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(CUDA_SKIP), reason=CUDA_SKIP or "GPU")]


def _device_batch(g, batch, dim, num_classes, dtype, *, stride=1):
    """Features drawn on the GPU (class means + noise, offset so shifts matter), optionally
    every `stride`-th column of a wider device tensor, with a few invalid rows."""
    means = torch.randn(num_classes, dim, generator=g, device="cuda", dtype=torch.float64) * 3 + 5
    labels = torch.randint(0, num_classes, (batch,), generator=g, device="cuda")
    wide = torch.randn(batch, dim * stride, generator=g, device="cuda", dtype=torch.float64)
    features = wide.to(dtype)[:, ::stride]
    features += means[labels].to(dtype)
    if batch > 3:
        labels[1] = num_classes  # out of range
        features[2, 0] = float("nan")
    return features, labels


def _check_against_reference(features, labels, num_classes, rtol=1e-12):
    """One native update of the batch against the float64 reference on the same device."""
    dim = features.shape[1]
    native, ref = new_state(num_classes, dim, "cuda"), new_state(num_classes, dim, "cuda")
    update(native_backend.update_stats_, native, features, labels)
    update(reference.update_stats_, ref, features.double(), labels)
    assert_state_matches(native, ref, rtol=rtol)
    return native


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_strided_device_features(dtype, seed):
    """Every other column of a device tensor: the kernels read through the column stride
    (a view made on the CPU and then moved would arrive dense)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x, y = _device_batch(g, 300, 45, 7, dtype, stride=2)
    assert x.stride(1) == 2 and x.is_cuda
    _check_against_reference(x, y, 7)
    valid = valid_rows(x, y, 7)
    means = torch.randn(7, 45, generator=g, device="cuda", dtype=torch.float64)
    weight = torch.randn(7, 45, generator=g, device="cuda", dtype=torch.float64)
    bias = torch.randn(7, generator=g, device="cuda", dtype=torch.float64)
    present = torch.ones(7, dtype=torch.bool, device="cuda")
    args = (x, valid, weight, bias, means, present)
    assert int(native_backend.ncc_mismatch_count(*args)) == int(reference.ncc_mismatch_count(*args))


@pytest.mark.parametrize("num_classes", [32, 100, 1000])
def test_ncc_with_many_classes(num_classes, seed):
    """C ≥ 32: every lane of the count kernel loops over several classes before the warp
    reduction; absent classes included. (Exact ties are the emulation's test: a tie made
    through duplicated classifier rows need not survive a GEMM bitwise.)"""
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(400, 24, num_classes, torch.float32, torch.int64, g, "cuda")
    valid = valid_rows(x, y, num_classes)
    means = torch.randn(num_classes, 24, generator=g, dtype=torch.float64) * 3 + 5
    weight = torch.randn(num_classes, 24, generator=g, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=g, dtype=torch.float64)
    present = torch.rand(num_classes, generator=g) > 0.2
    args = [a.cuda() for a in (x, valid, weight, bias, means, present)]
    got = int(native_backend.ncc_mismatch_count(*args))
    assert got == int(reference.ncc_mismatch_count(*args)) == ncc_numpy(*args)


@pytest.mark.parametrize("num_classes", [257, 1300])
def test_update_with_more_classes_than_a_block(num_classes, seed):
    """C > 256 (and > 1024): the list of each batch's classes, walked by all blocks of the
    second kernel, and the first-seen shifts spread over the row tiles, across batches."""
    g = torch.Generator().manual_seed(seed)
    native, ref = new_state(num_classes, 40, "cuda"), new_state(num_classes, 40)
    for batch in (900, 2000, 700):
        x, y = make_batch(batch, 40, num_classes, torch.bfloat16, torch.int32, g, "cuda")
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x.cpu(), y.cpu())
    assert_state_matches(native, ref)


def test_default_gram_scheme_on_a_large_batch(monkeypatch, seed):
    """NCFAST_GRAM unset: at P = 2048 the CUDA default picks the panel scheme from B·P² ≥ 2^32,
    i.e. 1024 rows on (and the plain product below; csrc/cuda/ops_cuda.cpp,
    cuda_panel_min_rows); both against the reference, the panels exactly symmetric."""
    monkeypatch.delenv("NCFAST_GRAM", raising=False)
    g = torch.Generator().manual_seed(seed)
    dim = 2048
    native, ref = new_state(10, dim, "cuda"), new_state(10, dim)
    for batch in (1100, 500):
        x, y = make_batch(batch, dim, 10, torch.float32, torch.int64, g, "cuda")
        update(native_backend.update_stats_, native, x, y)
        update(reference.update_stats_, ref, x.cpu(), y.cpu())
        if batch >= 1024:
            assert torch.equal(native["scatter"], native["scatter"].T)
    assert_state_matches(native, ref, rtol=1e-11)


def test_update_runs_on_the_current_stream(seed):
    """On a side stream whose input is still being written (the stream sleeps first), the
    update must wait for it: kernels and GEMMs on the current stream, not the default one."""
    g = torch.Generator().manual_seed(seed)
    x_host, y_host = make_batch(2000, 64, 10, torch.float32, torch.int64, g, "cpu")
    source = x_host.cuda()
    labels = y_host.cuda()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        state = new_state(10, 64, "cuda")
        features = torch.full_like(source, float("nan"))
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the input is ready
        features.copy_(source)
        update(native_backend.update_stats_, state, features, labels)
    side.synchronize()
    ref = new_state(10, 64)
    update(reference.update_stats_, ref, x_host, y_host)
    assert_state_matches(state, ref)


def test_class_stats_update_captured_in_a_cuda_graph(seed):
    """ClassStats.update has no host synchronisation, so it can be captured once and replayed
    on new batches copied into the static inputs."""
    g = torch.Generator().manual_seed(seed)
    batches = [make_batch(256, 32, 6, torch.float16, torch.int64, g, "cpu", bad=False)]
    batches += [make_batch(256, 32, 6, torch.float16, torch.int64, g, "cpu", bad=False)]
    static_x, static_y = batches[0][0].cuda(), batches[0][1].cuda()
    warm = ClassStats(6, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocator, cuBLAS handles)
        warm.update(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    stats = ClassStats(6, 32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats.update(static_x, static_y)
    ref = new_state(6, 32)
    for _ in range(2):
        for x, y in batches:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            update(reference.update_stats_, ref, x, y)
    assert_state_matches(stats.state_dict(), ref)


def test_batch_of_more_than_2_31_elements_in_fp16(seed):
    """B·P > 2^31 (2,097,216 × 1024 fp16, 4.3 GB): every element offset must be 64-bit. Peak
    memory ≈ 4.3 GB input + 17.2 GB float64 centered rows (native), then up to four float64
    copies of the batch for the reference (≈ 70 GB); skipped on smaller GPUs."""
    batch, dim, num_classes = 2**21 + 64, 1024, 10
    assert batch * dim > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 80e9:
        pytest.skip(f"needs ~80 GB of free GPU memory, {free / 1e9:.0f} GB free")
    g = torch.Generator(device="cuda").manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch,), generator=g, device="cuda")
    labels[-1000:] = num_classes - 1  # the class of the last rows, past element 2^31
    features = torch.randn(batch, dim, generator=g, device="cuda", dtype=torch.float16)
    features += labels[:, None].to(torch.float16)
    features[-1, -1] = float("inf")  # an invalid row at the very end
    native = new_state(num_classes, dim, "cuda")
    update(native_backend.update_stats_, native, features, labels)
    valid = torch.ones(batch, dtype=torch.bool, device="cuda")
    weight = torch.randn(num_classes, dim, generator=g, device="cuda", dtype=torch.float64)
    bias = torch.zeros(num_classes, device="cuda", dtype=torch.float64)
    means = torch.arange(num_classes, device="cuda", dtype=torch.float64)[:, None].expand(-1, dim)
    present = torch.ones(num_classes, dtype=torch.bool, device="cuda")
    valid[-1] = False
    nc4 = int(native_backend.ncc_mismatch_count(features, valid, weight, bias, means, present))
    torch.cuda.synchronize()
    ref = new_state(num_classes, dim, "cuda")
    update(reference.update_stats_, ref, features, labels)
    assert native["invalid"].tolist() == [0, 1]
    assert_state_matches(native, ref, rtol=1e-10)
    del ref
    torch.cuda.empty_cache()
    expected = int(reference.ncc_mismatch_count(features, valid, weight, bias, means, present))
    assert nc4 == expected


def test_deterministic_mode_on_cuda(seed):
    """The raw op raises torch's own error under torch.use_deterministic_algorithms(True);
    ClassStats.update then takes the reference and gives bitwise identical results."""
    g = torch.Generator().manual_seed(seed)
    x, y = make_batch(3000, 48, 20, torch.float32, torch.int64, g, "cuda", bad=False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        state = new_state(20, 48, "cuda")
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            torch.ops.ncfast.update_stats_(x, y, *(state[k] for k in STATE_KEYS))
        runs = [stats_from(x, y, 20, 48, device="cuda") for _ in range(2)]
        for k in STATE_KEYS:
            assert torch.equal(runs[0].state_dict()[k], runs[1].state_dict()[k]), k
    finally:
        torch.use_deterministic_algorithms(was)
