"""The interface every generation engine gives a model replica: two async calls, `complete` and
`stream`, the loading and unloading of LoRA adapters while it serves, plus the tokenizer's token
counting and chat template. Engines: transformers_engine.py
(CPU, or GPU without vLLM) and vllm_engine.py (GPU); engines.py picks one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path

from pipeline.loading import load_tokenizer
from pipeline.serving.types import Completion, Prompt, Sampling

# Used when a tokenizer ships no chat template (the demo's freshly trained BPE has none).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


class TokenizerOps:
    """What every engine, and the ingress, does with a Hugging Face tokenizer (`self.tokenizer`)."""

    def count_tokens(self, prompt: Prompt) -> int:
        if isinstance(prompt, list):
            return len(prompt)
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def prompt_text(self, prompt: Prompt) -> str:
        """The text a completion with `echo` starts with."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def unknown_token(self, prompt: Prompt) -> int | None:
        """A token id of the prompt that the tokenizer does not have, if any (the model would fail on it)."""
        if isinstance(prompt, list):
            return next((t for t in prompt if not 0 <= t < len(self.tokenizer)), None)
        return None

    def apply_chat_template(self, messages: list[dict]) -> str:
        template = None if self.tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )


class Tokenizer(TokenizerOps):
    """The tokenizer alone: the ingress counts prompt tokens and renders chat templates without a model."""

    def __init__(self, model_dir: str, trust_remote_code: bool):
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)


class Engine(TokenizerOps, ABC):
    @abstractmethod
    async def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        """The whole answer to one prompt; concurrent calls may be batched together."""

    @abstractmethod
    def stream(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[str]:
        """The answer's text, piece by piece as it is generated (an async generator)."""

    @abstractmethod
    async def add_adapter(self, model_id: str, path: Path) -> None:
        """Load the adapter in `path`; requests name it by `model_id` (Sampling.adapter)."""

    @abstractmethod
    def remove_adapter(self, model_id: str) -> None:
        """Unload it once the requests that use it have finished (called from any thread)."""
