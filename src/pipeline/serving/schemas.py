"""HTTP request bodies (ours and the OpenAI-compatible subset) and the settings a replica is
built from. OpenAI bodies ignore fields we do not implement (clients send `n`, `user`, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.config import PipelineConfig, ReplicaSettings


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


class ServeArgs(ReplicaSettings):
    """Everything one replica needs: the serve section's replica settings (validated as there) and the
    model to serve. Also the `args` of the app in a RayService serveConfigV2."""

    model_dir: str
    model_name: str = "llm-pipeline"
    trust_remote_code: bool = False
    api_key_sha256: str | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig, model_dir: str | Path, api_key_sha256: str | None = None) -> ServeArgs:
        return cls(
            model_dir=str(model_dir),
            model_name=cfg.name,
            trust_remote_code=cfg.model.trust_remote_code,
            api_key_sha256=api_key_sha256,
            **cfg.serve.replica_settings(),
        )
