"""Perplexity, decoding speed and size of an exported model, for the quantization report."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.loading import load_model, load_tokenizer
from pipeline.perplexity import perplexity


@torch.no_grad()
def generation_tokens_per_s(model, tokenizer, prompts: list[str], new_tokens: int = 32) -> float:
    """Greedy decoding speed at batch 1 (after one warm-up call)."""
    generated, elapsed = 0, 0.0
    for i, prompt in enumerate([prompts[0], *prompts]):
        ids = tokenizer(prompt[:200], return_tensors="pt").to(model.device)
        start = time.perf_counter()
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        if i:  # the first call only warms up
            elapsed += time.perf_counter() - start
            generated += out.shape[1] - ids["input_ids"].shape[1]
    return round(generated / elapsed, 1)


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def measure(model_dir: Path, texts: list[str], seq_len: int, trust_remote_code: bool) -> dict:
    """Load the model once on this machine's device; its bytes, held-out perplexity and tokens/s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_model(AutoModelForCausalLM, model_dir, trust_remote_code).to(device).eval()
    return {
        "bytes": weight_bytes(model_dir),
        "perplexity": round(perplexity(model, tokenizer, texts, seq_len), 4),
        "tokens_per_s": generation_tokens_per_s(model, tokenizer, texts[:3]),
    }
