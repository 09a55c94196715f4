"""vLLM engine for GPU replicas: AsyncLLMEngine with continuous batching. vLLM cannot be installed
beside llm-compressor, so this module is only imported where `choose_engine` found vLLM and a GPU
(requirements-vllm.txt); its arguments come from `engines.vllm_engine_args`, which is tested."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pipeline.loading import check_adapter_base, load_tokenizer, model_fingerprints
from pipeline.serving.adapters import check_lora_rank
from pipeline.serving.engine import Engine
from pipeline.serving.types import Completion, Prompt, Sampling, TokenLogprob, truncate_at_stop


def sampling_params(s: Sampling) -> dict:
    """vLLM's SamplingParams for a request: it implements every setting itself, the OpenAI penalties too."""
    return {
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stop": list(s.stop) or None,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "logprobs": s.logprobs,
        "prompt_logprobs": s.logprobs if s.echo else None,
    }


def vllm_prompt(prompt: Prompt) -> str | dict:
    """What vLLM's generate takes: the text, or a TokensPrompt (a dict) for token ids."""
    return prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}


def token_logprobs(token_ids: list[int], positions: list[dict]) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} as ours: the chosen token's, and what vLLM returned by rank."""
    out = []
    for token, candidates in zip(token_ids, positions):
        ranked = sorted(candidates.values(), key=lambda c: c.rank)
        chosen = candidates[token]
        out.append(TokenLogprob(chosen.decoded_token, chosen.logprob, [(c.decoded_token, c.logprob) for c in ranked]))
    return out


class VLLMEngine(Engine):
    """Adapters: vLLM loads an adapter when a request first names its LoRARequest and keeps the least
    recently used `max_loras` on the GPU (`max_cpu_loras` in host memory); this engine only keeps the
    requests, one per model id, under a positive integer id, which is how vLLM tells adapters apart."""

    def __init__(self, engine_args: dict):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args))
        self.tokenizer = load_tokenizer(engine_args["tokenizer"], engine_args["trust_remote_code"])
        self.model_dir, self.max_lora_rank = Path(engine_args["model"]), engine_args.get("max_lora_rank", 0)
        self.fits = model_fingerprints(self.model_dir) if engine_args.get("enable_lora") else set()
        self.loras, self.ids = {}, itertools.count(1)

    async def add_adapter(self, model_id: str, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        check_adapter_base(path, self.model_dir, self.fits)
        check_lora_rank(path, self.max_lora_rank)
        self.loras.setdefault(model_id, LoRARequest(model_id, next(self.ids), str(path)))

    def remove_adapter(self, model_id: str) -> None:
        self.loras.pop(model_id, None)  # a request running with it holds its own reference

    @staticmethod
    def _params(s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(**sampling_params(s))

    async def _outputs(self, prompt: Prompt, s: Sampling):
        lora = self.loras[s.adapter] if s.adapter else None
        request = {"request_id": uuid.uuid4().hex, "lora_request": lora}
        async for out in self.engine.generate(vllm_prompt(prompt), self._params(s), **request):
            yield out

    async def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        final = None
        async for output in self._outputs(prompt, sampling):
            final = output  # each output holds the whole text so far; the last one is the answer
        choice = final.outputs[0]
        text, _ = truncate_at_stop(choice.text, sampling.stop)
        logprobs = None if sampling.logprobs is None else token_logprobs(choice.token_ids, choice.logprobs)
        prompt = None
        if sampling.echo and sampling.logprobs is not None:  # vLLM gives the first prompt token None, as OpenAI does
            ids = final.prompt_token_ids
            first = TokenLogprob(self.tokenizer.decode(ids[:1]), None, [])
            prompt = [first, *token_logprobs(ids[1:], final.prompt_logprobs[1:])]
        return Completion(
            text, len(final.prompt_token_ids), len(choice.token_ids), choice.finish_reason or "stop", logprobs, prompt
        )

    async def stream(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[str]:
        sent = 0
        async for out in self._outputs(prompt, sampling):
            text = out.outputs[0].text
            yield text[sent:]
            sent = len(text)
