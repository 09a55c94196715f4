"""HTTP request bodies (ours and the OpenAI-compatible subset) and the settings a replica is
built from. OpenAI bodies ignore fields we do not implement (clients send `n`, `user`, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import PipelineConfig, ReplicaSettings
from pipeline.train.formats import message_content


def _unicode(text: str) -> str:
    """JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode. Pydantic refuses
    one in a str field; the text parts of a chat message are dicts it does not look into."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"at character {e.start} ({text[e.start]!a})"
        raise ValueError(f"holds a lone surrogate {where}: not valid Unicode text") from None
    return text


def _stop_list(v):
    return [] if v is None else [v] if isinstance(v, str) else v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, min_length=1, description="an adapter's name; default: the base model")
    prompt: str = Field(..., min_length=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    _stop = field_validator("stop", mode="before")(_stop_list)


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI parameters this server does not implement: a request that sets one is refused (400, naming it)
# rather than answered as if it had been honoured
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "suffix",
    "best_of",
    "prediction",
    "audio",
    "modalities",
)


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user`, `metadata` and the like change nothing here
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="choices; each samples on its own (seed + index when seeded)")
    seed: int | None = Field(None, description="makes sampling repeatable")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    _stop = field_validator("stop", mode="before")(_stop_list)

    # declared only to be refused, each by its name (a 400 whose `param` says which)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    suffix: Any = None
    best_of: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, value, info):
        harmless = value in (None, False, [], {"type": "text"}) or (info.field_name == "best_of" and value == 1)
        if not harmless:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return None

    @model_validator(mode="after")
    def _one_choice_when_streaming(self):
        if self.stream and self.n > 1:
            raise ValueError("n > 1 is not supported with stream: true")
        return self

    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's logprob comes with, or None for no logprobs."""
        return None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="text, or the token ids to read")
    logprobs: int | None = Field(None, ge=0, le=5, description="the legacy API's count of top alternatives")
    echo: bool = Field(
        False, description="the text starts with the prompt, and logprobs with the prompt's (lm-eval's loglikelihood)"
    )

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _no_echo_in_a_stream(self):
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream: true")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_nonempty_prompt(cls, v):
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if len(prompts) != 1 or not prompts[0]:
            raise ValueError("exactly one non-empty prompt is supported")
        return prompts[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] = Field(..., description="a string, or a list of text parts")

    @field_validator("content")
    @classmethod
    def _text_of_parts(cls, content):
        return _unicode(message_content(content, "content"))  # a non-text part is refused with its type

    def plain(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ServeArgs(ReplicaSettings):
    """Everything one replica needs: the serve section's replica settings (validated as there) and the
    model to serve. Also the `args` of the app in a RayService serveConfigV2."""

    model_dir: str
    model_name: str = "llm-pipeline"
    adapters_dir: str | None = Field(None, description="LoRA adapters served beside the base, a folder each")
    trust_remote_code: bool = False
    api_key_sha256: str | None = None

    @classmethod
    def from_config(
        cls,
        cfg: PipelineConfig,
        model_dir: str | Path,
        api_key_sha256: str | None = None,
        adapters_dir: str | Path | None = None,
    ) -> ServeArgs:
        return cls(
            model_dir=str(model_dir),
            adapters_dir=str(adapters_dir) if adapters_dir else None,
            model_name=cfg.name,
            trust_remote_code=cfg.model.trust_remote_code,
            api_key_sha256=api_key_sha256,
            **cfg.serve.replica_settings(),
        )
