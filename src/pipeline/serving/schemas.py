"""HTTP request/response bodies and the settings a serving replica is built from."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ServeArgs(BaseModel):
    """Everything one replica needs; also the `args` of the app in a RayService serveConfigV2."""
    model_config = ConfigDict(extra="forbid")
    model_dir: str
    model_name: str = "llm-pipeline"
    engine: str = "auto"
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2
    num_cpus: float = 0.5
    num_gpus: float = 0
