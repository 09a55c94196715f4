"""The one typed config for the whole pipeline: YAML file + `key.sub=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and lists
what is allowed instead of being silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config problem, worded for the user (the CLI prints it without a traceback)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DedupConfig(Section):
    exact: bool = Field(True, description="drop documents whose normalized text is identical")
    fuzzy: bool = Field(True, description="drop MinHash-LSH near-duplicates")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity that counts as duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(5, ge=1, le=32, description="word n-gram (shingle) size")


class DataConfig(Section):
    input: list[str] = Field(default_factory=lambda: ["data/corpus/*.jsonl"],
                             description="files or globs: .jsonl/.json/.parquet/.txt, optionally .gz")
    text_field: str = "text"
    id_field: str = "id"
    lowercase: bool = False
    min_words: int = Field(5, ge=0, description="drop documents with fewer words")
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_path_is_a_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("input"), str):
            values = {**values, "input": [values["input"]]}
        return values


class ModelConfig(Section):
    path: str | None = Field(None, description="local HF causal-LM directory; None builds `preset`")
    preset: Literal["tiny-moe", "tiny-dense"] = "tiny-moe"
    vocab_size: int = Field(2048, ge=256, description="BPE vocabulary when a tokenizer is trained")
    tokenizer_docs: int = Field(2000, ge=10, description="curated documents the tokenizer trains on")
    seq_len: int = Field(128, ge=16, description="training sequence length (tokens)")


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapter, e.g. embed_tokens and "
        "lm_head when the base model was just built with a new tokenizer")


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5, gt=0, description="<1 leaves CPUs for Ray Data's feeding tasks on small machines")
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(3e-5, gt=0)
    warmup_steps: int = Field(5, ge=0)
    max_steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(20, ge=1)
    seed: int = 0
    lora: LoraSettings = Field(default_factory=LoraSettings)


class QuantizeConfig(Section):
    enabled: bool = True
    method: Literal["awq"] = "awq"
    bits: Literal[4] = 4
    group_size: int = Field(128, ge=32, description="weights per quantization group")
    symmetric: bool = True
    calib_samples: int = Field(64, ge=1, description="curated documents AWQ calibrates on")
    calib_seq_len: int = Field(128, ge=16)
    eval_samples: int = Field(32, ge=1, description="held-out curated documents the quality gate scores")
    max_ppl_increase: float = Field(
        0.02, description="quality gate: fail when 4-bit perplexity exceeds 16-bit by more than this fraction")


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2, gt=0, description="autoscaling aims at this many requests per replica")
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (vLLM is used when >0 and installed)")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: requests per model.generate call (1 = off)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="@serve.batch: wait this long to fill a batch")
    max_queue: int = Field(64, ge=1, description="requests a replica holds before answering 429")
    request_timeout_s: float = Field(120, gt=0, description="a request running longer gets 408")
    api_key_env: str = Field("PIPELINE_API_KEY", description="env var holding the API key; unset = no key")
    max_new_tokens: int = Field(256, ge=1, description="cap on tokens a request may ask for")
    max_prompt_tokens: int = Field(1024, ge=1)
    demo_prompt: str = Field("Permission is hereby granted", description="what `pipeline run` asks the endpoint")

    @model_validator(mode="after")
    def _replica_range(self) -> "ServeConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class PipelineConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="run name: outputs go to runs_dir/name/")
    runs_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def stage_dir(self, stage: str) -> Path:
        return Path(self.runs_dir).resolve() / self.name / stage


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, 1e-4, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(_allowed_keys(e['loc']))}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None
