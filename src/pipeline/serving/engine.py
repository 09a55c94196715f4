"""Generation engines behind one small interface: transformers (CPU, or GPU without vLLM) and
vLLM (GPU with vLLM installed; its own environment, see requirements-vllm.txt).

The transformers engine generates a whole batch in one `model.generate` call (left padding), which
is what `@serve.batch` in serve/app.py feeds it, and streams single requests token by token.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from pipeline.loading import load_model

log = logging.getLogger("pipeline.serve")

# Used when a tokenizer ships no chat template (the demo's freshly trained BPE has none).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class Engine(Protocol):
    def count_tokens(self, text: str) -> int: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...
    def generate_batch(self, prompts: list[str], sampling: list[Sampling]) -> list[Completion]: ...
    def stream(self, prompt: str, sampling: Sampling) -> Iterator[str]: ...


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TokenizerOps:
    """What every engine does with its Hugging Face tokenizer (`self.tokenizer`)."""

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def apply_chat_template(self, messages: list[dict]) -> str:
        template = None if self.tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)


class Tokenizer(TokenizerOps):
    """The tokenizer alone: the ingress counts prompt tokens and renders chat templates without a model."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)


class TransformersEngine(TokenizerOps):
    continuous_batching = False  # batches come from @serve.batch in the app

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(AutoModelForCausalLM, model_dir).to(self.device).eval()

    def _generate_kwargs(self, s: Sampling) -> dict:
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.temperature > 0 \
            else {"do_sample": False}
        return {"pad_token_id": self.tokenizer.pad_token_id, **sampling}

    @torch.no_grad()
    def generate_batch(self, prompts: list[str], sampling: list[Sampling]) -> list[Completion]:
        """One forward pass per token for the whole batch; requests whose sampling settings differ
        from each other are generated in separate groups."""
        results: list[Completion | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(sampling):
            groups.setdefault((s.temperature, s.top_p), []).append(i)
        for idx in groups.values():
            for i, c in zip(idx, self._generate_group([prompts[i] for i in idx], [sampling[i] for i in idx])):
                results[i] = c
        return results

    def _generate_group(self, prompts: list[str], sampling: list[Sampling]) -> list[Completion]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**enc, max_new_tokens=max(s.max_new_tokens for s in sampling),
                                  **self._generate_kwargs(sampling[0]))
        width = enc["input_ids"].shape[1]
        completions = []
        for row, mask, s in zip(out, enc["attention_mask"], sampling):
            new = row[width:width + s.max_new_tokens].tolist()
            eos = self.tokenizer.eos_token_id
            hit_eos = eos in new
            new = new[:new.index(eos)] if hit_eos else new
            text, stopped = truncate_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), s.stop)
            completions.append(Completion(text, int(mask.sum()), len(new) + hit_eos,
                                          "stop" if hit_eos or stopped else "length"))
        return completions

    def stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (generation runs in a thread)."""
        from transformers import TextIteratorStreamer

        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
                      **self._generate_kwargs(sampling))
        thread = threading.Thread(target=torch.no_grad()(self.model.generate), kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_engine(requested: str, vllm_present: bool | None = None) -> str:
    vllm_present = vllm_available() if vllm_present is None else vllm_present
    if requested == "auto":
        return "vllm" if vllm_present else "transformers"
    if requested == "vllm" and not vllm_present:
        raise RuntimeError("serve.engine=vllm needs the vllm package and a GPU on the replica "
                           "(see requirements-vllm.txt); use serve.engine=transformers or auto")
    return requested


def vllm_engine_args(model_dir: str, max_model_len: int, max_num_seqs: int) -> dict:
    """AsyncEngineArgs for vLLM. Our AWQ output is compressed-tensors, which vLLM detects from the
    model's config.json; continuous batching replaces `@serve.batch` there."""
    return {"model": model_dir, "tokenizer": model_dir, "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs, "dtype": "auto", "gpu_memory_utilization": 0.85,
            "trust_remote_code": False}


def load_engine(model_dir: str, requested: str = "auto", max_model_len: int = 2048, max_num_seqs: int = 64):
    kind = choose_engine(requested)
    log.info("serving %s with the %s engine", model_dir, kind)
    if kind == "vllm":
        from pipeline.serving.vllm_engine import VLLMEngine

        return VLLMEngine(vllm_engine_args(model_dir, max_model_len, max_num_seqs))
    return TransformersEngine(model_dir)
