"""ncfast against the multi-pass peer (rhubarbwu/neural-collapse's accumulators, reproduced in
``bench/peer_nc.py``) on the same token features at a language model's vocabulary.

The features are those of bench/bench_vocab.py (Zipf-distributed next-token labels over
``--vocab`` ids, class structure plus noise, float32 ``[B, T, P]``; 1% of positions ignored).
The peer reads them three times, as its README describes (means, then the covariance about those
means, then the decisions); ncfast once (:class:`ncfast.tokens.TokenMeasurement` with the head,
NC4 from its buffer). Both see the positions that are not ignored, flattened.

Definitional mapping (docs/language_models.md), so that the numbers are comparable:

- the peer gets the classes present only for its means (absent classes have zero "means" in its
  accumulator and would enter Σ_B and the nearest-mean search) and the sample-weighted global
  mean (SPEC §1; the peer's default is the plain mean of the class means);
- NC1: the peer's Σ_B is M̄M̄ᵀ/P where SPEC's is M̄M̄ᵀ/C, so SPEC's NC1 = the peer's × C/P;
- NC2: the peer's number (distance of the normalised Gram of the centred means from the simplex
  ETF's) is not one of SPEC's keys; it is computed from ncfast's class means and compared;
- NC4: the peer's agreement rate = 1 − SPEC's NC4 (same head, no bias; absent classes are moved
  out of the peer's nearest-mean search).

    python bench/bench_lm_peer.py                 # CPU: C = 50257, P = 768, 16384 tokens
    python bench/bench_lm_peer.py --device cuda --tokens 262144

Results: ``bench/results/lm_peer_<device>.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import peer_nc  # noqa: E402  (bench/peer_nc.py)
from bench_scale import _cpu_name, _CpuMemory, _CudaMemory  # noqa: E402
from bench_vocab import batches, sync  # noqa: E402

from ncfast.tokens import TokenMeasurement  # noqa: E402

FAR = 1e18  # an absent class's "mean" for the peer's nearest-mean search: never the nearest


def timed(device, memory, work):
    """(result, wall seconds, peak bytes above the start) of ``work()``."""
    base = memory.start()
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return result, time.perf_counter() - start, memory.peak() - base


def flat_rows(data):
    for features, labels in data:
        rows, row_labels = features.reshape(-1, features.shape[-1]), labels.reshape(-1)
        keep = row_labels >= 0
        yield rows[keep], row_labels[keep]


def run_ncfast(args, device, data, weight):
    def work():
        tokens = TokenMeasurement(args.vocab, args.dim, weight, device=device)
        for features, labels in data:
            tokens.update(features, labels)
        sync(device)
        start = time.perf_counter()
        result = dict(tokens.compute())
        return tokens, result, time.perf_counter() - start

    return work


def run_peer(args, device, data, weight):
    def work():
        dtype = getattr(torch, args.peer_dtype)
        means_acc = peer_nc.PeerMeans(args.vocab, args.dim, device, dtype)
        for x, y in flat_rows(data):  # pass 1
            means_acc.update(x, y)
        means, mean_global = means_acc.compute(weighted=True)
        present = means_acc.counts > 0
        cov = peer_nc.PeerCovariance(args.vocab, args.dim, means, device, dtype)
        for x, y in flat_rows(data):  # pass 2
            cov.update(x, y)
        sigma_w = cov.compute()
        search = means.clone()
        search[~present] = FAR
        decisions = peer_nc.PeerDecisions(args.vocab, args.dim, search, weight, device, dtype)
        for x, y in flat_rows(data):  # pass 3
            decisions.update(x, y)
        kept = means[present]
        return {
            "nc1": peer_nc.nc1_pinv(kept.double(), sigma_w.double(), mean_global.double()),
            "nc2_etf_error": peer_nc.nc2_etf_error(kept.double(), mean_global.double()),
            "nc4_agreement": peer_nc.nc4_agreement(decisions),
            "classes_present": int(present.sum()),
        }

    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=1 << 14)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--peer-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    class_means = torch.randn(args.vocab, args.dim, generator=g) * 0.5
    weight = (class_means + 0.3 * torch.randn(args.vocab, args.dim, generator=g)).to(device)
    data = list(batches(args, device, class_means, g))  # the same features for both
    memory = _CudaMemory(torch, device) if device.type == "cuda" else _CpuMemory()

    (tokens, ours, our_metrics_s), our_s, our_peak = timed(
        device, memory, run_ncfast(args, device, data, weight)
    )
    theirs, peer_s, peer_peak = timed(device, memory, run_peer(args, device, data, weight))
    c, p = ours["classes_present"], args.dim
    means, _ = tokens.stats.finalized()
    kept = means[tokens.stats.present]
    nc2_from_ours = peer_nc.nc2_etf_error(kept, tokens.stats.global_mean)
    rows = [
        ("NC1 (SPEC)", ours["nc1"], theirs["nc1"] * c / p, "peer × C/P"),
        ("NC2 (peer's ETF error)", nc2_from_ours, theirs["nc2_etf_error"], "ncfast's means"),
        ("NC4 (mismatch)", ours["nc4_ncc_mismatch"], 1 - theirs["nc4_agreement"], "1 − agreement"),
        ("classes present", c, theirs["classes_present"], ""),
        ("passes over the data", 1, 3, "means, covariance, decisions"),
        ("time (s)", our_s, peer_s, f"peer/ncfast = {peer_s / our_s:.2f}×"),
        ("  of which final metrics", our_metrics_s, math.nan, "ncfast: every SPEC key"),
        ("peak memory (MiB)", our_peak / 2**20, peer_peak / 2**20, memory.method),
    ]
    machine = _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    lines = [
        f"ncfast vs the multi-pass peer on the same token features, {device} ({machine}, "
        f"{torch.get_num_threads()} threads; shared and busy: times are upper bounds)",
        f"C = {args.vocab}, P = {p}, {ours['num_samples']} tokens, Zipf {args.zipf}; peer "
        f"accumulates in {args.peer_dtype}, ncfast in float64",
        f"{'':24} {'ncfast':>14} {'peer (mapped)':>14}  mapping / note",
    ]
    for name, a, b, note in rows:
        lines.append(f"{name:24} {a:>14.6g} {b:>14.6g}  {note}")
    for key in ("NC1", "NC2", "NC4"):
        a, b = next((r[1], r[2]) for r in rows if r[0].startswith(key))
        lines.append(f"{key} relative difference: {abs(a - b) / max(abs(a), 1e-300):.2e}")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lm_peer_{device.type}"
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
