"""HTTP request bodies (ours and the OpenAI-compatible subset) and the settings a replica is
built from. OpenAI bodies ignore fields we do not implement (clients send `n`, `user`, ...)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _stop_list(v):
    return [] if v is None else [v] if isinstance(v, str) else v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    _stop = field_validator("stop", mode="before")(_stop_list)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    _stop = field_validator("stop", mode="before")(_stop_list)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_nonempty_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1 or not prompts[0]:
            raise ValueError("exactly one non-empty prompt is supported")
        return prompts[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ServeArgs(BaseModel):
    """Everything one replica needs; also the `args` of the app in a RayService serveConfigV2."""
    model_config = ConfigDict(extra="forbid")
    model_dir: str
    model_name: str = "llm-pipeline"
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_queue: int = 64
    request_timeout_s: float = 120
    api_key_env: str = "PIPELINE_API_KEY"
    api_key_sha256: str | None = None
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2
    upscale_delay_s: float = 5
    downscale_delay_s: float = 30
    num_cpus: float = 0.5
    num_gpus: float = 0
