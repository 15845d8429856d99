"""Tiny float64 language models of the transformers library, for the integration's tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_gpt2(seed: int, vocab: int, dim: int, seq: int) -> nn.Module:
    """A one-layer float64 GPT-2 in eval mode (``vocab`` tokens, width ``dim``, ``seq``
    positions, two heads), its head tied to the input embedding, dropout 0.1."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=seq, n_embd=dim, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()
