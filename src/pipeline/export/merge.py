"""Merge a LoRA adapter into its base in 16/32-bit. peft cannot merge into a quantized model,
so this always happens before quantization. A fully fine-tuned model is only cast."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def merge_adapter(base_dir: str | Path, trained_dir: str | Path, out: Path, dtype: torch.dtype) -> Path:
    """`trained_dir` holds a LoRA adapter for `base_dir`, or (after full fine-tuning) a whole model."""
    if (Path(trained_dir) / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(trained_dir)).merge_and_unload()
    else:
        merged = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=dtype)
    merged.generation_config = GenerationConfig(
        bos_token_id=merged.config.bos_token_id, eos_token_id=merged.config.eos_token_id,
        pad_token_id=merged.config.pad_token_id, max_new_tokens=64)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
