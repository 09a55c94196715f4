"""Generation engines behind one small interface: transformers (CPU, or GPU without vLLM) and
vLLM (GPU with vLLM installed; its own environment, see requirements-vllm.txt)."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger("pipeline.serve")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class PromptTooLong(ValueError):
    pass


class Engine(Protocol):
    def count_tokens(self, text: str) -> int: ...
    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 stop: list[str]) -> Completion: ...


def _truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TransformersEngine:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).eval()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 stop: list[str]) -> Completion:
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = out[0, inputs["input_ids"].shape[1]:]
        text, stopped = _truncate_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), stop)
        hit_eos = bool(len(new) and new[-1].item() == self.tokenizer.eos_token_id)
        return Completion(text, inputs["input_ids"].shape[1], len(new),
                          "stop" if stopped or hit_eos else "length")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_engine(requested: str) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise RuntimeError("serve.engine=vllm needs the vllm package and a GPU on the replica "
                           "(see requirements-vllm.txt); use serve.engine=transformers or auto")
    return requested


def vllm_engine_args(model_dir: str, max_model_len: int) -> dict:
    """What the vLLM engine is started with. compressed-tensors (our AWQ output) is detected from
    the model's config by vLLM itself."""
    return {"model": model_dir, "tokenizer": model_dir, "max_model_len": max_model_len,
            "dtype": "auto", "gpu_memory_utilization": 0.85, "enforce_eager": False}


def load_engine(model_dir: str, requested: str = "auto", max_model_len: int = 2048) -> Engine:
    kind = choose_engine(requested)
    log.info("serving %s with the %s engine", model_dir, kind)
    if kind == "vllm":
        from pipeline.serving.vllm_engine import VLLMEngine

        return VLLMEngine(vllm_engine_args(model_dir, max_model_len))
    return TransformersEngine(model_dir)
