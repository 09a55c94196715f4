"""Merge a LoRA adapter into its base. peft cannot merge into a quantized model, so this happens
before quantization; it also gives each training stage after the first its starting model. A fully
fine-tuned model is only cast.

The merge streams: tensors are read one at a time from the base's safetensors shards (loading.Checkpoint),
W + (alpha / r) * B @ A is computed in fp32 for the adapted ones, and output shards of at most
`max_shard_bytes` are written as they fill, so its memory is one output shard, not the model. The
output keeps the base's dtype unless asked for another. Adapters it cannot read as plain LoRA deltas
(DoRA, per-layer ranks, LoRA on parameters, ...) are merged by peft in memory instead.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from pipeline.loading import (
    Checkpoint,
    check_adapter_base,
    load_adapter,
    load_model,
    load_model_config,
    load_tokenizer,
)
from pipeline.shards import MAX_SHARD_BYTES, pack, write_shards

log = logging.getLogger("pipeline.merge")

PEFT_PREFIX = "base_model.model."
# adapter_config.json keys that make an adapter more than W + scale * B @ A on whole modules
NOT_PLAIN = ("use_dora", "rank_pattern", "alpha_pattern", "target_parameters", "lora_bias", "layer_replication")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def merge_adapter(
    base_dir: str | Path,
    trained_dir: str | Path,
    out: Path,
    dtype: torch.dtype | None,
    trust_remote_code: bool,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """`trained_dir` holds a LoRA adapter for `base_dir`, or (after full fine-tuning) a whole model.
    `dtype`: of the output; None keeps the base's. The tokenizer comes from `tokenizer_dir`, by default
    `base_dir`."""
    trained_dir = Path(trained_dir)
    adapter = (trained_dir / "adapter_config.json").is_file()
    source = Path(base_dir) if adapter else trained_dir
    if adapter:
        check_adapter_base(trained_dir, Path(base_dir))  # refuses an adapter trained on another model
    if not stream_merge(source, trained_dir if adapter else None, out, dtype, trust_remote_code):
        log.info("merging %s in memory (not a plain LoRA adapter on safetensors shards)", trained_dir)
        model = load_model(AutoModelForCausalLM, source, trust_remote_code, dtype=dtype or "auto")
        if adapter:
            model = load_adapter(model, trained_dir).merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
    architecture = load_model_config(out, trust_remote_code)
    GenerationConfig(
        bos_token_id=architecture.bos_token_id,
        eos_token_id=architecture.eos_token_id,
        pad_token_id=architecture.pad_token_id,
        max_new_tokens=64,
    ).save_pretrained(out)
    load_tokenizer(tokenizer_dir or base_dir, trust_remote_code).save_pretrained(out)
    return out


def lora_deltas(adapter_dir: Path, names: set[str]) -> tuple[dict, dict, float] | None:
    """({weight: (A, B)}, {weight: replacement}, scale) of a plain LoRA adapter whose every tensor has a
    base weight in `names`; None otherwise."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    plain = config.get("peft_type") == "LORA" and not any(config.get(key) for key in NOT_PLAIN)
    if not plain or not (adapter_dir / "adapter_model.safetensors").is_file():
        return None  # peft's path says what is wrong with a pickled adapter
    pairs, replaced = {}, {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix(PEFT_PREFIX)
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                pairs.setdefault(name.removesuffix(part) + ".weight", [None, None])[slot] = tensor
                break
        else:
            replaced[name] = tensor  # modules_to_save: trained in full
    if not set(pairs) | set(replaced) <= names or any(None in ab for ab in pairs.values()):
        return None
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    return {k: tuple(v) for k, v in pairs.items()}, replaced, scale


def stream_merge(
    base_dir: Path,
    adapter_dir: Path | None,
    out: Path,
    dtype: torch.dtype | None,
    trust_remote_code: bool,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> bool:
    """Write base (+ adapter) to `out` tensor by tensor; False, writing nothing, when it cannot."""
    checkpoint = Checkpoint(base_dir)
    if not checkpoint.file_of:
        return False
    deltas, replaced, scale = {}, {}, 0.0
    if adapter_dir is not None:
        found = lora_deltas(adapter_dir, set(checkpoint.file_of))
        if found is None:
            return False
        deltas, replaced, scale = found
    out.mkdir(parents=True, exist_ok=True)

    def size(name: str) -> int:
        view = checkpoint.slice(name)
        width = (dtype or DTYPES.get(view.get_dtype(), torch.float32)).itemsize
        return math.prod(view.get_shape()) * width

    def merged(name: str) -> torch.Tensor:
        tensor = replaced.get(name)
        tensor = checkpoint.read(name) if tensor is None else tensor
        target = (dtype or tensor.dtype) if tensor.is_floating_point() else tensor.dtype
        if name in deltas:
            a, b = deltas[name]
            tensor = tensor.float() + scale * (b.float() @ a.float())
        return tensor.to(target).contiguous()

    groups = pack(list(checkpoint.file_of), size, max_shard_bytes)
    write_shards(out, [lambda group=group: {key: merged(key) for key in group} for group in groups])
    architecture = load_model_config(base_dir, trust_remote_code)
    if dtype is not None:
        architecture.dtype = dtype
    architecture.save_pretrained(out)
    for code in base_dir.glob("*.py"):  # a model that ships its own code (auto_map) needs it beside the weights
        shutil.copy2(code, out / code.name)
    return True
