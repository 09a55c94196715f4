"""Merge a LoRA adapter into its base in 16/32-bit. peft cannot merge into a quantized model,
so this always happens before quantization."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out: Path, dtype: torch.dtype) -> Path:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.generation_config = GenerationConfig(
        bos_token_id=merged.config.bos_token_id, eos_token_id=merged.config.eos_token_id,
        pad_token_id=merged.config.pad_token_id, max_new_tokens=64)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
