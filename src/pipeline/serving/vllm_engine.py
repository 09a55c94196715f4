"""vLLM engine for GPU replicas. vLLM cannot be installed beside llm-compressor, so this module
is only imported where `choose_engine` found vLLM and a GPU (requirements-vllm.txt)."""
from __future__ import annotations

from pipeline.serving.engine import Completion, _truncate_at_stop


class VLLMEngine:
    def __init__(self, engine_args: dict):
        from vllm import LLM  # noqa: PLC0415 (optional dependency)

        self.llm = LLM(**engine_args)
        self.tokenizer = self.llm.get_tokenizer()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                 stop: list[str]) -> Completion:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop or None)
        out = self.llm.generate([prompt], params, use_tqdm=False)[0]
        choice = out.outputs[0]
        text, _ = _truncate_at_stop(choice.text, stop)
        return Completion(text, len(out.prompt_token_ids), len(choice.token_ids), choice.finish_reason or "stop")
