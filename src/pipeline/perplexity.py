"""Held-out perplexity, the score the quantize stage's quality gate compares: of a model, and of a LoRA
adapter on each base it may be served on (the adapt stage's check of the 4-bit base)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.loading import load_adapter, load_base_for_adapters, load_tokenizer


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int) -> float:
    """exp of the mean next-token cross-entropy, from the logits: a model's own `loss` may add more (an
    MoE model saved asking for its router's logits adds the balancing loss, +2% on the demo's)."""
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"]
        if ids.shape[1] < 2:
            continue
        ids = ids.to(model.device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / max(total_tokens, 1))


def adapter_perplexities(
    adapter: Path, bases: dict[str, Path], texts: list[str], seq_len: int, trust_remote_code: bool
) -> dict[str, float]:
    """An adapter's held-out perplexity on each base it may be served on (its 16-bit base, the 4-bit
    export of it), one base in memory at a time."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(next(iter(bases.values())), trust_remote_code)  # the bases share one
    out = {}
    for name, base in bases.items():
        model = load_adapter(load_base_for_adapters(base, trust_remote_code), adapter).to(device).eval()
        out[name] = round(perplexity(model, tokenizer, texts, seq_len), 4)
        del model
    return out
