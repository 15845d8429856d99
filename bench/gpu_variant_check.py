"""One fixed measurement on cuda:0 through the native backend of whichever ncfast._C is on the
path, for bench/gpu_check.sh's ``ptxjit`` and ``fallback`` steps: the SASS build saves its
numbers, the PTX-JIT runs (``CUDA_FORCE_PTX_JIT=1``, or an extension with PTX of a lower
architecture only) and the fallback (an extension without the device's architecture) compare
theirs with them.

    python bench/gpu_variant_check.py --label sass --save sass.json
    CUDA_FORCE_PTX_JIT=1 python bench/gpu_variant_check.py --label jit --compare sass.json \\
        --expect ptx

Prints ``VERDICT PASS|FAIL|SKIPPED <label>: <why>`` and ``FIGURES {json}`` lines, which
bench/gpu_check_report.py reads; exit 0 unless the script itself broke.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

RTOL = 1e-9  # float64 atomics add in run order: equal to rounding, not bit for bit


def measure(device: str) -> dict[str, float]:
    import torch

    from ncfast import Measurement

    gen = torch.Generator().manual_seed(0)
    classes, dim, batch = 100, 64, 512
    means = 3.0 * torch.randn(classes, dim, generator=gen)
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(classes, generator=gen, dtype=torch.float64)
    m = Measurement(
        classes, dim, weight.to(device), bias.to(device), weight_decay=1e-3, device=device
    )
    for _ in range(8):
        labels = torch.randint(0, classes, (batch,), generator=gen)
        features = means[labels] + torch.randn(batch, dim, generator=gen)
        m.update(features.to(device), labels.to(device))
    out = m.compute()
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def differences(got: dict[str, float], want: dict[str, float]) -> list[str]:
    bad = [k for k in want if k not in got]
    for key, value in want.items():
        other = got.get(key)
        if other is None or (math.isnan(value) and math.isnan(other)):
            continue
        if abs(other - value) > RTOL * max(1.0, abs(value)):
            bad.append(f"{key}: {other!r} vs {value!r}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--expect", choices=["sass", "ptx", "fallback"], default="sass")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args(argv)
    import torch

    try:  # torch's own kernels first: under CUDA_FORCE_PTX_JIT=1 they need torch's PTX
        torch.ones(8, device=args.device).cumsum(0).sum().item()
    except RuntimeError as exc:
        print(
            f"VERDICT SKIPPED {args.label}: torch itself does not run here: {exc}".splitlines()[0]
        )
        return 0
    from ncfast.backend import native, ops

    on_gpu = args.device == "cuda"
    capability = torch.cuda.get_device_capability(0) if on_gpu else None
    image = native.kernel_image_for(capability, native.COMPILED_TARGETS) if capability else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numbers = measure(args.device)
    fallbacks = [w for w in caught if issubclass(w.category, native.NativeKernelFallbackWarning)]
    figures = {
        "backend": ops.BACKEND,
        "targets": native.CUDA_ARCH_LIST,
        "image": str(image),
        "fallback_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in fallbacks],
    }
    print("FIGURES " + json.dumps({args.label: figures}))
    problems = []
    if ops.BACKEND != "native":
        problems.append(f"backend is {ops.BACKEND}, not native")
    if on_gpu and args.expect == "fallback" and (image is not None or len(fallbacks) != 1):
        problems.append(f"expected one fallback warning and no image: {image}, {len(fallbacks)}")
    if args.expect != "fallback" and fallbacks:
        problems.append(f"unexpected fallback: {fallbacks[0].message}")
    forced = os.environ.get("CUDA_FORCE_PTX_JIT") == "1"  # the driver JIT-compiles the PTX
    if on_gpu and args.expect == "ptx" and not forced and (image is None or not image.ptx):
        problems.append(f"expected a PTX image, got {image}")
    if args.save:
        args.save.write_text(json.dumps(numbers, indent=1) + "\n")
    if args.compare:
        if not args.compare.is_file():
            problems.append(f"no SASS numbers to compare with ({args.compare} missing)")
        else:
            problems += differences(numbers, json.loads(args.compare.read_text()))
    verdict = "FAIL" if problems else "PASS"
    print(f"VERDICT {verdict} {args.label}: {'; '.join(problems) or f'{len(numbers)} keys agree'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
