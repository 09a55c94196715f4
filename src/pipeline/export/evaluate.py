"""Perplexity and size of an exported model, for the quantization report."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def perplexity(model_dir: Path, texts: list[str], seq_len: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"]
        if ids.shape[1] < 2:
            continue
        loss = model(input_ids=ids, labels=ids).loss
        total_nll += loss.item() * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / max(total_tokens, 1))


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
