"""vLLM engine for GPU replicas: AsyncLLMEngine with continuous batching. vLLM cannot be installed
beside llm-compressor, so this module is only imported where `choose_engine` found vLLM and a GPU
(requirements-vllm.txt); its arguments come from `engine.vllm_engine_args`, which is tested."""
from __future__ import annotations

import uuid
from typing import AsyncIterator

from pipeline.serving.engine import Completion, Sampling, TokenizerOps, truncate_at_stop


class VLLMEngine(TokenizerOps):
    continuous_batching = True

    def __init__(self, engine_args: dict):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(engine_args["tokenizer"])

    @staticmethod
    def _params(s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              stop=list(s.stop) or None)

    async def _outputs(self, prompt: str, s: Sampling):
        async for out in self.engine.generate(prompt, self._params(s), request_id=uuid.uuid4().hex):
            yield out

    async def agenerate(self, prompt: str, s: Sampling) -> Completion:
        final = None
        async for final in self._outputs(prompt, s):
            pass
        choice = final.outputs[0]
        text, _ = truncate_at_stop(choice.text, s.stop)
        return Completion(text, len(final.prompt_token_ids), len(choice.token_ids), choice.finish_reason or "stop")

    async def astream(self, prompt: str, s: Sampling) -> AsyncIterator[str]:
        sent = 0
        async for out in self._outputs(prompt, s):
            text = out.outputs[0].text
            yield text[sent:]
            sent = len(text)
