"""Which engine a model replica runs: vLLM on a GPU where it is installed (its own environment, see
requirements-vllm.txt), transformers everywhere else."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

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


def vllm_lora_args(adapters_dir: str | None, max_loras: int, max_lora_rank: int) -> dict | None:
    """With an adapters folder to serve, LoRA is on from the start (adapters may arrive later): vLLM holds
    at most `max_loras` on the GPU at once and sizes its LoRA buffers for `max_lora_rank`."""
    if not adapters_dir:
        return None
    return {"max_loras": max_loras, "max_lora_rank": max_lora_rank}


def load_engine(args: ServeArgs, on_batch: Callable[[int], None], max_model_len: int = 2048) -> Engine:
    kind = choose_engine(args.engine)
    log.info("serving %s with the %s engine, adapters from %s", args.model_dir, kind, args.adapters_dir or "nowhere")
    if kind == "vllm":
        from pipeline.serving.vllm_engine import VLLMEngine

        lora = vllm_lora_args(args.adapters_dir, args.max_loras, args.max_lora_rank)
        return VLLMEngine(vllm_engine_args(args.model_dir, max_model_len, args.max_queue, args.trust_remote_code, lora))
    from pipeline.serving.transformers_engine import TransformersEngine

    lora = bool(args.adapters_dir)
    return TransformersEngine(
        args.model_dir, args.trust_remote_code, lora, args.max_batch_size, args.batch_wait_timeout_s, on_batch
    )
