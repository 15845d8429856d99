"""Both native ops on awkward shapes, each result checked against the reference: the workload
that bench/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck).

Shapes straddle every tile edge of the kernels (rows 1, 127, 129, 257 against the first
kernel's blocks of 4 rows and the row tiles of 128; columns 1, 33, 70 against 32; classes 1, 5,
600 against a warp and the second kernel's blocks of 128 threads), with strided features made
on the device, labels of several dtypes (strided too), invalid rows, empty batches, classes
first seen in a later batch, the panel Gram scheme (its mirror kernel) and NC4 with absent
classes.

    python bench/sanitize_ops.py                 # on cuda; prints one line, exit 1 on mismatch
    python bench/sanitize_ops.py --device cpu    # the same on the CPU kernels (a smoke test)

Small on purpose: under a sanitizer every kernel runs one to two orders of magnitude slower.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ncfast.backend import reference  # noqa: E402
from ncfast.backend.reference import STATE_KEYS, new_state  # noqa: E402

try:
    from ncfast.backend import native as _native
except ImportError as exc:
    sys.exit(f"sanitize_ops: the native extension is not available ({exc})")

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def batch(g, rows, dim, num_classes, dtype, label_dtype, device, classes=None):
    """Strided device features (every other column) and strided labels of `label_dtype`, with
    one out-of-range label and one non-finite row when there are enough rows."""
    labels = torch.randint(0, classes or num_classes, (2 * rows,), generator=g, device=device)
    wide = torch.randn(rows, 2 * dim, generator=g, device=device, dtype=torch.float64)
    features = (wide + labels[::2, None].double()).to(dtype)[:, ::2]
    labels = labels.to(label_dtype)[::2]
    if rows >= 3:
        labels[1] = num_classes  # label dtypes are chosen to hold num_classes
        features[2, dim - 1] = float("nan")
    return features, labels


def check_update_case(g, rows_per_batch, dim, num_classes, dtype, label_dtype, device) -> None:
    native, ref = new_state(num_classes, dim, device), new_state(num_classes, dim, device)
    for k, rows in enumerate(rows_per_batch):
        classes = max(1, num_classes // 2) if k == 0 else None  # the rest first seen later
        x, y = batch(g, rows, dim, num_classes, dtype, label_dtype, device, classes)
        _native.update_stats_(x, y, *(native[key] for key in STATE_KEYS))
        reference.update_stats_(x, y, *(ref[key] for key in STATE_KEYS))
    case = f"update B={rows_per_batch} P={dim} C={num_classes} {dtype} labels {label_dtype}"
    if not all(torch.equal(native[key], ref[key]) for key in ("counts", "invalid")):
        raise AssertionError(f"{case}: counts or invalid differ")
    keys = ("counts", "shift", "sums", "scatter")
    m_nat, s_nat = reference.finalize_stats(*(native[key] for key in keys))
    m_ref, s_ref = reference.finalize_stats(*(ref[key] for key in keys))
    # float64 accumulation over at most a few hundred rows: far below 1e-10 relative.
    scale_m = float(m_ref.abs().max()) or 1.0
    scale_s = float(s_ref.abs().max()) or 1.0
    err_m = float((m_nat - m_ref).abs().max()) / scale_m
    err_s = float((s_nat - s_ref).abs().max()) / scale_s
    if not (err_m < 1e-10 and err_s < 1e-10):
        raise AssertionError(f"{case}: means rel err {err_m:.1e}, Σ_W rel err {err_s:.1e}")


def check_ncc_case(g, rows, dim, num_classes, dtype, device) -> None:
    x, y = batch(g, rows, dim, num_classes, dtype, torch.int64, device)
    valid = (y >= 0) & (y < num_classes) & torch.isfinite(x.double()).all(dim=1)
    opts = {"generator": g, "device": device, "dtype": torch.float64}
    means = torch.randn(num_classes, dim, **opts) + 2
    weight = torch.randn(num_classes, dim, **opts)
    bias = torch.randn(num_classes, **opts)
    present = torch.rand(num_classes, generator=g, device=device) > 0.3
    present[0] = True
    args = (x, valid, weight, bias, means, present)
    got, expected = int(_native.ncc_mismatch_count(*args)), int(reference.ncc_mismatch_count(*args))
    if got != expected:
        raise AssertionError(f"nc4 B={rows} P={dim} C={num_classes} {dtype}: {got} != {expected}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and _native.WITH_CUDA):
        print("sanitize_ops: --device cuda needs a GPU and CUDA kernels", file=sys.stderr)
        return 2
    g = torch.Generator(device=device).manual_seed(args.seed)
    updates = ncc = 0
    shapes = [((1, 129), 1, 1), ((127, 257), 33, 5), ((129,), 70, 600), ((0, 40), 33, 5)]
    for (rows, dim, num_classes), dtype in itertools.product(shapes, DTYPES):
        fits = [t for t in LABEL_DTYPES if torch.iinfo(t).max >= num_classes]
        label_dtype = fits[(dim + DTYPES.index(dtype)) % len(fits)]
        check_update_case(g, rows, dim, num_classes, dtype, label_dtype, device)
        updates += 1
    os.environ["NCFAST_GRAM"] = "panels"  # the upper-triangle panels and the mirror kernel
    try:
        check_update_case(g, (257, 130), 70, 5, torch.float32, torch.int64, device)
        updates += 1
    finally:
        del os.environ["NCFAST_GRAM"]
    for rows, dim, num_classes in ((1, 1, 1), (129, 33, 5), (257, 70, 40), (0, 5, 3)):
        check_ncc_case(g, rows, dim, num_classes, torch.bfloat16, device)
        ncc += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_ops: {updates} update and {ncc} NC4 cases on {device} match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
