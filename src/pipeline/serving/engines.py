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


def vllm_engine_args(model_dir: str, max_model_len: int, max_num_seqs: int, trust_remote_code: bool) -> dict:
    """AsyncEngineArgs for vLLM. Our AWQ output is compressed-tensors, which vLLM detects from the
    model's config.json; vLLM batches continuously, so the transformers engine's batcher is not used."""
    return {
        "model": model_dir,
        "tokenizer": model_dir,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "dtype": "auto",
        "gpu_memory_utilization": 0.85,
        "trust_remote_code": trust_remote_code,
    }


def load_engine(args: ServeArgs, on_batch: Callable[[int], None], max_model_len: int = 2048) -> Engine:
    kind = choose_engine(args.engine)
    log.info("serving %s with the %s engine", args.model_dir, kind)
    if kind == "vllm":
        from pipeline.serving.vllm_engine import VLLMEngine

        return VLLMEngine(vllm_engine_args(args.model_dir, max_model_len, args.max_queue, args.trust_remote_code))
    from pipeline.serving.transformers_engine import TransformersEngine

    return TransformersEngine(
        args.model_dir, args.trust_remote_code, args.max_batch_size, args.batch_wait_timeout_s, on_batch
    )
