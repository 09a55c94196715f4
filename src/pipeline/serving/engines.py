"""Which engine a model replica runs: vLLM on a GPU where it is installed (its own environment, see
requirements-vllm.txt), transformers everywhere else."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.serving.adapters import find_adapters
from pipeline.serving.engine import Engine
from pipeline.serving.schemas import ServeArgs

log = logging.getLogger("pipeline.serve")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_engine(requested: str, vllm_present: bool | None = None) -> str:
    vllm_present = vllm_available() if vllm_present is None else vllm_present
    if requested == "auto":
        return "vllm" if vllm_present else "transformers"
    if requested == "vllm" and not vllm_present:
        raise RuntimeError(
            "serve.engine=vllm needs the vllm package and a GPU on the replica "
            "(see requirements-vllm.txt); use serve.engine=transformers or auto"
        )
    return requested


def vllm_engine_args(
    model_dir: str, max_model_len: int, max_num_seqs: int, trust_remote_code: bool, lora: dict | None = None
) -> dict:
    """AsyncEngineArgs for vLLM. Our AWQ output is compressed-tensors, which vLLM detects from the
    model's config.json; vLLM batches continuously, so the transformers engine's batcher is not used.
    `lora`: enable_lora's settings when there are adapters (each request names its own LoRARequest)."""
    return {
        **({"enable_lora": True, **lora} if lora else {}),
        "model": model_dir,
        "tokenizer": model_dir,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "dtype": "auto",
        "gpu_memory_utilization": 0.85,
        "trust_remote_code": trust_remote_code,
    }


def vllm_lora_args(adapters: dict[str, Path], max_loras: int, max_lora_rank: int) -> dict | None:
    """vLLM holds at most `max_loras` adapters on the GPU at once (least recently used out); the rank
    bound must cover every adapter's, and it sizes vLLM's LoRA buffers."""
    if not adapters:
        return None
    ranks = {name: json.loads((path / "adapter_config.json").read_text())["r"] for name, path in adapters.items()}
    too_big = {name: r for name, r in ranks.items() if r > max_lora_rank}
    if too_big:
        listed = ", ".join(f"{name} has rank {r}" for name, r in too_big.items())
        raise ConfigError(f"LoRA adapters over serve.max_lora_rank={max_lora_rank} ({listed}): raise it")
    return {"max_loras": min(max_loras, len(adapters)), "max_lora_rank": max_lora_rank}


def load_engine(args: ServeArgs, on_batch: Callable[[int], None], max_model_len: int = 2048) -> Engine:
    kind = choose_engine(args.engine)
    adapters = find_adapters(args.adapters_dir, args.model_name)
    log.info("serving %s with the %s engine, adapters: %s", args.model_dir, kind, ", ".join(adapters) or "none")
    if kind == "vllm":
        from pipeline.serving.vllm_engine import VLLMEngine

        lora = vllm_lora_args(adapters, args.max_loras, args.max_lora_rank)
        engine_args = vllm_engine_args(args.model_dir, max_model_len, args.max_queue, args.trust_remote_code, lora)
        return VLLMEngine(engine_args, adapters)
    from pipeline.serving.transformers_engine import TransformersEngine

    return TransformersEngine(
        args.model_dir, args.trust_remote_code, adapters, args.max_batch_size, args.batch_wait_timeout_s, on_batch
    )
