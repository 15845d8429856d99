"""Vocabulary-scale benchmark: token-level Neural Collapse at GPT-2's vocabulary (C = 50,257,
P = 768), the case of Wu & Papyan's "Linguistic Collapse" (NeurIPS 2024).

Synthetic token features with Zipf-distributed next-token labels (exponent ``--zipf``, ids in a
random order over the vocabulary, 1% of positions ignored as padding) stream through
:class:`ncfast.tokens.TokenMeasurement` in ``[B, T, P]`` float32 batches. Reported:

- state memory: the accumulators (8C + 16CP + 8P² bytes: C·P float64 shifts and sums), checked
  against the tensors;
- update: seconds per 10⁶ tokens (timed over ``--tokens`` tokens, scaled linearly: the work per
  token does not depend on how many came before);
- NC4: seconds per 10⁶ tokens of the nearest-class-mean count against the whole vocabulary's
  head (timed on ``--nc4-tokens`` tokens, scaled);
- metrics: ``nc_metrics(stats, W)`` (every SPEC key but NC4) on the final statistics: time and
  peak memory above the state (CPU: resident high-water mark; CUDA: max_memory_allocated, as
  bench/bench_scale.py measures them).

    python bench/bench_vocab.py                         # CPU, 2^18 tokens, scaled to 10^6
    python bench/bench_vocab.py --device cuda --tokens 1048576

Results: ``bench/results/vocab_<device>.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_scale import _cpu_name, _CpuMemory, _CudaMemory, accumulator_bytes  # noqa: E402

import ncfast  # noqa: E402
from ncfast.nc4 import NCCMismatch  # noqa: E402
from ncfast.tokens import TokenMeasurement  # noqa: E402

MILLION = 1_000_000


def zipf_labels(count: int, vocab: int, exponent: float, g: torch.Generator) -> torch.Tensor:
    """``count`` token ids drawn with P(rank r) ∝ r^−exponent, ranks mapped to random ids."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.randperm(vocab, generator=g)
    drawn = torch.multinomial(ranks.pow(-exponent), count, replacement=True, generator=g)
    return ids[drawn]


def batches(args, device, class_means: torch.Tensor, g: torch.Generator):
    """``(features [B, T, P] float32, labels [B, T])`` with class structure plus noise."""
    seq = args.seq_len
    per_batch = args.batch_tokens // seq
    for _ in range(max(1, args.tokens // args.batch_tokens)):
        labels = zipf_labels(per_batch * seq, args.vocab, args.zipf, g).view(per_batch, seq)
        noise = torch.randn(per_batch, seq, args.dim, generator=g)
        features = class_means[labels] + noise
        labels[torch.rand(per_batch, seq, generator=g) < 0.01] = -100
        yield features.to(device), labels.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    class_means = torch.randn(args.vocab, args.dim, generator=g) * 0.5
    weight = (class_means + 0.3 * torch.randn(args.vocab, args.dim, generator=g)).to(device)
    memory = _CudaMemory(torch, device) if device.type == "cuda" else _CpuMemory()
    tokens = TokenMeasurement(args.vocab, args.dim, device=device)
    update_s, update_cpu_s, seen = 0.0, 0.0, 0
    for features, labels in batches(args, device, class_means, g):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens.update(features, labels)
        sync(device)
        update_s += time.perf_counter() - start
        update_cpu_s += time.process_time() - start_cpu
        seen += labels.numel()
    state = tokens.stats.state_dict()
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    del state
    assert state_bytes == accumulator_bytes(args.vocab, args.dim), state_bytes

    ncc = NCCMismatch(weight)
    sample = argparse.Namespace(**{**vars(args), "batch_tokens": args.nc4_tokens})
    nc4_features, nc4_labels = next(batches(sample, device, class_means, g))
    rows, row_labels = nc4_features.view(-1, args.dim), nc4_labels.view(-1)
    keep = row_labels >= 0
    ncc.update(rows[keep], row_labels[keep])
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    mismatches, total = (int(t) for t in ncc.count(tokens.stats))
    nc4_s, nc4_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu

    tokens.stats.finalized()  # cached means and Σ_W: part of the state's lifetime, not metrics
    base = memory.start()
    start, start_cpu = time.perf_counter(), time.process_time()
    metrics = ncfast.nc_metrics(tokens.stats, weight)
    sync(device)
    metrics_s, metrics_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    peak = memory.peak() - base
    return {
        "device": str(device),
        "machine": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vocab": args.vocab,
        "dim": args.dim,
        "zipf": args.zipf,
        "tokens_timed": seen,
        "tokens_measured": tokens.num_tokens,
        "classes_present": metrics["classes_present"],
        "state_bytes": state_bytes,
        "update_s": update_s,
        "update_s_per_million": update_s * MILLION / seen,
        "update_cpu_s_per_million": update_cpu_s * MILLION / seen,
        "nc4_tokens": total,
        "nc4_mismatch_on_sample": mismatches / max(total, 1),
        "nc4_s_per_million": nc4_s * MILLION / max(total, 1),
        "nc4_cpu_s_per_million": nc4_cpu_s * MILLION / max(total, 1),
        "metrics_s": metrics_s,
        "metrics_cpu_s": metrics_cpu_s,
        "metrics_peak_bytes": peak,
        "memory_method": memory.method,
        "nc1": metrics["nc1"],
    }


def report(r: dict) -> str:
    mb = 1 << 20
    return "\n".join(
        [
            f"vocabulary-scale token NC on {r['device']} ({r['machine']}, {r['threads']} "
            f"threads; torch {r['torch']}; a shared, busy machine: times are upper bounds)",
            f"C = {r['vocab']}, P = {r['dim']}, Zipf exponent {r['zipf']}: "
            f"{r['tokens_measured']} tokens measured, {r['classes_present']} classes present",
            f"state memory           {r['state_bytes'] / mb:10.1f} MiB  (8C + 16CP + 8P² bytes)",
            "                          wall        CPU time (all threads)",
            f"update, per 10^6 tokens {r['update_s_per_million']:9.1f} s "
            f"{r['update_cpu_s_per_million']:9.1f} s"
            f"   (timed on {r['tokens_timed']} tokens, scaled)",
            f"NC4 count, per 10^6     {r['nc4_s_per_million']:9.1f} s "
            f"{r['nc4_cpu_s_per_million']:9.1f} s"
            f"   (timed on {r['nc4_tokens']} tokens; argmax over all C rows)",
            f"metrics (nc_metrics)    {r['metrics_s']:9.1f} s {r['metrics_cpu_s']:9.1f} s, peak "
            f"{r['metrics_peak_bytes'] / mb:.0f} MiB above the state ({r['memory_method']})",
            f"nc1 = {r['nc1']:.4g}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=1 << 18)
    parser.add_argument("--nc4-tokens", type=int, default=1 << 12)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    result = run(args)
    text = report(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"vocab_{torch.device(args.device).type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
