"""Merge a LoRA adapter into its base. peft cannot merge into a quantized model, so this happens
before quantization; it also gives each training stage after the first its starting model. A fully
fine-tuned model is only cast."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from pipeline.loading import load_adapter, load_model, load_tokenizer


def merge_adapter(
    base_dir: str | Path,
    trained_dir: str | Path,
    out: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """`trained_dir` holds a LoRA adapter for `base_dir`, or (after full fine-tuning) a whole model.
    The tokenizer comes from `tokenizer_dir`, by default `base_dir`."""
    if (Path(trained_dir) / "adapter_config.json").is_file():
        base = load_model(AutoModelForCausalLM, base_dir, trust_remote_code, dtype=dtype)
        merged = load_adapter(base, trained_dir).merge_and_unload()
    else:
        merged = load_model(AutoModelForCausalLM, trained_dir, trust_remote_code, dtype=dtype)
    merged.generation_config = GenerationConfig(
        bos_token_id=merged.config.bos_token_id,
        eos_token_id=merged.config.eos_token_id,
        pad_token_id=merged.config.pad_token_id,
        max_new_tokens=64,
    )
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(tokenizer_dir or base_dir, trust_remote_code).save_pretrained(out)
    return out
