"""Neural Collapse of a small GPT-2 as it learns to predict the next byte, measured with ncfast.

A GPT-2 (random initialisation from a ``transformers.GPT2Config``: nothing is downloaded) learns
byte-level next-token prediction on text that ships with Python itself: the docstrings of ~40
standard-library modules (English prose about the library, under the PSF license; about 300 KB;
``python -OO`` strips them, so run without it). Every ``--every`` steps the held-out tenth of the
text is measured in one pass by :func:`ncfast.integrations.transformers.measure_language_model`:
the classes are the 256 byte values, the features the input of the output head (tied to the
embedding, no bias), and NC1, NC4 and the model's own loss come from the same forward passes.
Two figures are written (``--out``, default ``docs/language_model``): NC1, NC4 and the loss
against the step, and the distribution of the next-byte counts by rank (Zipf-like). A few
minutes on a CPU::

    python examples/language_model.py [--steps 200] [--every 20] [--out docs/language_model]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ncfast.integrations.transformers import measure_language_model
from ncfast.report.plots import new_figure, save_figure

# Modules of the standard library whose docstrings make the corpus (pure Python, on every
# install); their classes' and functions' docstrings, in name order.
CORPUS_MODULES = (
    "argparse", "ast", "asyncio.events", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "http.client", "imaplib",
    "inspect", "json", "locale", "logging", "mailbox", "optparse", "pathlib", "pdb", "pickle",
    "pprint", "queue", "random", "shutil", "smtplib", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case", "urllib.request",
    "uuid", "warnings", "zipfile",
)  # fmt: skip
COLUMNS = ("step", "train_loss", "loss", "nc1", "nc4_ncc_mismatch", "classes_present")


def corpus_text(modules: tuple[str, ...] = CORPUS_MODULES) -> str:
    """The docstrings of the classes and functions defined in ``modules``, joined."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    text = "\n\n".join(parts)
    if len(text) < 10_000:
        raise RuntimeError(
            "the standard library's docstrings are missing (python -OO?): the example needs them"
        )
    return text


def sequences(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of a 1-d byte tensor."""
    n = len(data) // seq_len
    return data[: n * seq_len].view(n, seq_len)


def figures(history: list[dict], counts: np.ndarray, out: Path) -> list[Path]:
    """NC1, NC4 and the losses against the step; the next-byte counts by rank (log-log)."""
    steps = [row["step"] for row in history]
    fig, axes = new_figure(1, 3, (10.5, 3.0))
    panels = [
        ("nc1", r"NC1 = tr($\Sigma_W \Sigma_B^\dagger$)/C", True),
        ("nc4_ncc_mismatch", "NC4: NCC mismatch", False),
        ("loss", "cross-entropy (nats/byte)", False),
    ]
    for ax, (key, title, logy) in zip(axes[0], panels, strict=True):
        ax.plot(steps, [row[key] for row in history], "o-", markersize=3, label="held-out")
        if key == "loss":
            ax.plot(steps, [row["train_loss"] for row in history], "s--", markersize=3,
                    label="training (mean since last)")  # fmt: skip
            ax.legend(fontsize=7)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    paths = save_figure(fig, out, "language_model_nc", formats=("png",))
    fig, axes = new_figure(1, 1, (4.0, 3.0))
    ax = axes[0, 0]
    ranked = np.sort(counts[counts > 0])[::-1]
    ax.loglog(np.arange(1, len(ranked) + 1), ranked, ".", markersize=3)
    ax.set_xlabel("rank of the next byte")
    ax.set_ylabel("count (held-out)")
    ax.set_title(f"{len(ranked)} of {len(counts)} classes present", fontsize=9)
    return paths + save_figure(fig, out, "language_model_counts", formats=("png",))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="measure every N steps")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=96, help="n_embd, the feature dimension P")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out bytes measured")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/language_model"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = torch.tensor(list(corpus_text().encode("utf-8")), dtype=torch.long)
    split = len(data) - min(args.eval_tokens, len(data) // 10)
    train = sequences(data[:split], args.seq_len)
    held_out = sequences(data[split:], args.seq_len)
    eval_batches = [{"input_ids": ids} for ids in held_out.split(64)]
    config = GPT2Config(
        vocab_size=256, n_positions=args.seq_len, n_embd=args.width, n_layer=args.layers,
        n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)
    print(f"{len(data)} bytes of docstrings; {len(train)} training sequences of {args.seq_len}")
    print(" ".join(f"{c:>16}" for c in COLUMNS))
    history: list[dict] = []
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            result = measure_language_model(model, eval_batches, counts=True)
            row = {key: result[key] for key in COLUMNS[2:]}
            row.update(step=step, train_loss=float(np.mean(losses)) if losses else math.nan)
            history.append(row)
            counts = result["token_counts"].numpy()
            losses = []
            print(" ".join(f"{row[c]:>16.5g}" for c in COLUMNS), flush=True)
        if step == args.steps:
            break
        model.train()
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    print(f"trained and measured in {time.perf_counter() - started:.0f} s")
    for path in figures(history, counts, args.out):
        print(f"wrote {path}")
    return history


if __name__ == "__main__":
    main()
