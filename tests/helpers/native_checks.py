"""What the tests of the compiled ops share: whether the extension (and its CUDA kernels) can
run here, test batches of every dtype and layout, the comparison of two accumulator states, and
a numpy count of NC4 mismatches."""

from __future__ import annotations

import numpy as np
import torch

from ncfast.backend import reference
from ncfast.backend.reference import STATE_KEYS

try:
    from ncfast.backend import native as native_backend

    NATIVE_MISSING = ""
except ImportError as exc:  # no compiled extension: the reference backend is in use
    native_backend = None
    NATIVE_MISSING = f"ncfast._C is not built ({exc})"


def _cuda_skip_reason() -> str:
    """Why the CUDA kernels cannot run here ("" when they can)."""
    if native_backend is None:
        return NATIVE_MISSING
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not native_backend.WITH_CUDA:
        return "ncfast._C was built without CUDA kernels"
    return ""


CUDA_SKIP = _cuda_skip_reason()


def update(fn, state, features, labels):
    """One ``update_stats_`` of ``fn`` (either backend's op) on the accumulator ``state``."""
    fn(features, labels, *(state[k] for k in STATE_KEYS))


def finalized(state):
    """Class means and N Σ_W of an accumulator state, computed on the CPU by the reference."""
    means, sigma_w = reference.finalize_stats(
        *(state[k].cpu() for k in ("counts", "shift", "sums", "scatter"))
    )
    return means, sigma_w * state["counts"].sum().cpu().clamp(min=1)  # N Σ_W: scale-free check


def make_batch(batch, dim, num_classes, dtype, label_dtype, g, device, *, bad=True, layout=0):
    """Features of dtype `dtype` (class means plus noise, an offset so shifts matter), labels of
    `label_dtype`; with `bad`, some labels out of range and some rows non-finite; `layout`
    picks contiguous, transposed (column-major) or strided (every other column) features."""
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * 3 + 5
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    features = means[labels] + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if bad and batch > 3:
        high = min(num_classes + 3, torch.iinfo(label_dtype).max)
        labels[1] = high if high >= num_classes else 0
        if label_dtype.is_signed:
            labels[2] = -1
        features[3, dim // 2] = float("nan") if batch % 2 else float("inf")
    features = features.to(dtype)
    if layout == 1:
        features = features.t().contiguous().t()
    elif layout == 2:
        wide = torch.zeros(batch, 2 * dim, dtype=dtype)
        wide[:, ::2] = features
        features = wide[:, ::2]
    return features.to(device), labels.to(label_dtype).to(device)


def valid_rows(features, labels, num_classes):
    """The rows the ops count: label in range and every feature finite."""
    ok = (labels.long() >= 0) & (labels.long() < num_classes)
    return ok & torch.isfinite(features.double()).all(dim=1)


def assert_state_matches(native_state, ref_state, rtol=1e-12):
    """Equal counts and invalid counts; means and N Σ_W within ``rtol`` (N Σ_W: of its largest
    entry)."""
    assert torch.equal(native_state["counts"].cpu(), ref_state["counts"].cpu())
    assert torch.equal(native_state["invalid"].cpu(), ref_state["invalid"].cpu())
    seen = ref_state["counts"].cpu() > 0
    m_nat, s_nat = finalized(native_state)
    m_ref, s_ref = finalized(ref_state)
    torch.testing.assert_close(m_nat[seen], m_ref[seen], rtol=rtol, atol=1e-12)
    scale = float(s_ref.abs().max()) or 1.0
    torch.testing.assert_close(s_nat, s_ref, rtol=0, atol=rtol * scale)


def ncc_numpy(features, valid, weight, bias, means, present):
    """Valid rows whose classifier argmax is not their nearest present class mean, in numpy."""
    h = features.double().cpu().numpy()
    w, b, mu = weight.cpu().numpy(), bias.cpu().numpy(), means.cpu().numpy()
    classes = np.flatnonzero(present.cpu().numpy())
    count = 0
    for i in np.flatnonzero(valid.cpu().numpy()):
        nearest = classes[np.argmin([np.sum((h[i] - mu[k]) ** 2) for k in classes])]
        count += int(np.argmax(w @ h[i] + b) != nearest)
    return count
