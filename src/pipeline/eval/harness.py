"""Which folders eval.models names, and lm-evaluation-harness run on one of them as a Ray task (its HF
backend, on a model loaded under the pipeline's loading rules: safetensors only, remote code if trusted)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from pipeline.config import ConfigError, EvalConfig, PipelineConfig
from pipeline.handoff import (
    adapters_dir,
    merged_model_dir,
    model_folder,
    served_model_dir,
    stage_model_dir,
    student_model_dir,
)

log = logging.getLogger("pipeline.eval")
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of perplexities is bootstrapped; its 100,000 default takes minutes on a CPU


@dataclass(frozen=True)
class EvalModel:
    """A model to score: `path` is its folder, or the base an `adapter` goes on; an endpoint is scored at
    `url` over HTTP under the model name `served_as`, and `path` is the model it serves (its tokenizer)."""

    name: str
    path: Path
    adapter: Path | None = None
    url: str | None = None
    served_as: str | None = None


def resolve(cfg: PipelineConfig, name: str) -> list[EvalModel]:
    """The model(s) one name of eval.models stands for; `served` is the one the quantize stage serves."""
    if name == "served":
        return resolve(cfg, served_model_dir(cfg).name)  # quantize/merged or quantize/awq
    if name == "endpoint":  # its url is known once it is up (eval/stage.py)
        return [EvalModel(name, served_model_dir(cfg), url=cfg.eval.endpoint_url, served_as=cfg.name)]
    if name == "base":
        start = Path(cfg.model.path) if cfg.model.path else cfg.stage_dir("train") / "base"
        return [EvalModel(name, model_folder(start, "base model", "run `pipeline train` first"))]
    if name == "merged":
        return [EvalModel(name, merged_model_dir(cfg))]
    if name == "student":
        return [EvalModel(name, student_model_dir(cfg))]
    if name.startswith("stage:"):
        return [EvalModel(name, stage_model_dir(cfg, name.partition(":")[2]))]
    if name == "awq":
        where = cfg.stage_dir("quantize") / "awq"
        return [EvalModel(name, model_folder(where, "4-bit model", "run `pipeline quantize` with quantize.enabled"))]
    folder = adapters_dir(cfg)
    names = [spec.name for spec in cfg.adapters] if name == "adapters" else [name.partition(":")[2]]
    missing = [n for n in names if folder is None or not (folder / n / "adapter_config.json").is_file()]
    if missing or not names:
        raise ConfigError(
            f"eval.models: no adapter {', '.join(missing) or '(the config lists none)'}; run `pipeline adapt`"
        )
    return [EvalModel(f"adapter:{n}", merged_model_dir(cfg), folder / n) for n in names]


def scored_names(settings: EvalConfig) -> list[str]:
    """What an eval scores: eval.models, the reference and the gates' models and references, once each."""
    gated = (n for g in settings.gate for n in (g.model, g.reference) if n)
    return list(dict.fromkeys([*settings.models, settings.reference, *gated]))


def eval_models(cfg: PipelineConfig) -> list[EvalModel]:
    """The models scored_names names: each folder once, under the first name given."""
    models: dict[tuple, EvalModel] = {}
    for name in scored_names(cfg.eval):
        for model in resolve(cfg, name):
            models.setdefault((model.path, model.adapter, model.name == "endpoint"), model)
    return list(models.values())


def _load(model: EvalModel, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_adapter, load_base_for_adapters, load_model

    if model.adapter is None:
        return load_model(AutoModelForCausalLM, model.path, trust_remote_code)
    # merged in memory: lm-eval's HF backend scores a plain transformers model
    return load_adapter(load_base_for_adapters(model.path, trust_remote_code), model.adapter).merge_and_unload()


def _hf_model(model: EvalModel, settings: EvalConfig, trust_remote_code: bool):
    """lm-eval's HF backend on the model loaded here."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipeline.loading import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFLM(
        pretrained=_load(model, trust_remote_code).to(device).eval(),
        tokenizer=load_tokenizer(model.path, trust_remote_code),
        device=device,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        # a 16-bit model's log-softmax in 16 bits is off by about 0.05% of the loglikelihood, as the
        # server's (in 32 bits, as vLLM's) is not: scored alike, in-process and endpoint agree
        softmax_dtype="float32",
    )


def endpoint_args(model: EvalModel, settings: EvalConfig, max_prompt_tokens: int, api_key: str | None) -> dict:
    """lm-eval's local-completions backend on our OpenAI route: loglikelihoods come from the prompt's own
    logprobs (echo), prompts go as token ids (a window of a long document starts and ends where its tokens
    do; decoded to text and tokenized again by the server it could come back as other tokens), a batch's
    worth of requests at once so that the server batches them. A window of eval.max_length tokens is sent
    after its context token, and one token is generated (scored, not read): the server must take
    max_length + 1 prompt tokens."""
    window = settings.max_length or max_prompt_tokens - 1
    if window + 1 > max_prompt_tokens:
        raise ConfigError(
            f"eval.max_length {window}: the endpoint takes prompts of up to serve.max_prompt_tokens "
            f"({max_prompt_tokens}) tokens, and a window is sent with one token more; lower eval.max_length"
        )
    return {
        "base_url": f"{model.url}/v1/completions",
        "model": model.served_as,
        "tokenizer": str(model.path),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": settings.batch_size,
        # lm-eval keeps one of an API's max_length for the token generated and cuts a document into windows one
        # shorter again (a window is sent after its context token); its HF backend's windows are max_length
        # long: +2 gives the two the same windows
        "max_length": window + 2,
        "max_retries": 3,
        **({"header": {"Authorization": f"Bearer {api_key}"}} if api_key else {}),
    }


@ray.remote(num_cpus=1)
def score(model: EvalModel, tasks: list, settings: EvalConfig, trust_remote_code: bool, endpoint: dict) -> dict:
    """lm-eval's simple_evaluate on one model; what the report needs of its output. `endpoint`: the
    local-completions arguments when the model is an endpoint."""
    import lm_eval

    start = time.time()
    out = lm_eval.simple_evaluate(
        model="local-completions" if model.url else _hf_model(model, settings, trust_remote_code),
        model_args=endpoint or None,
        tasks=tasks,
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples")
    return {**{k: out.get(k) for k in keep}, "seconds": round(time.time() - start, 1)}


def score_all(cfg: PipelineConfig, models: list[EvalModel], tasks: list, settings: EvalConfig) -> dict[str, dict]:
    """Every model as its own Ray task (a GPU each when the cluster has GPUs, but for an endpoint, which
    has its own), as many at once as fit."""
    gpus = 1 if ray.cluster_resources().get("GPU") else 0
    offline = all(isinstance(t, dict) for t in tasks)  # our own files only: never ask the dataset hub
    env = {"env_vars": {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}} if offline else {}
    key, trust = os.environ.get(cfg.serve.api_key_env), cfg.model.trust_remote_code
    running = {}
    for m in models:
        endpoint = endpoint_args(m, settings, cfg.serve.max_prompt_tokens, key) if m.url else {}
        task = score.options(num_gpus=0 if m.url else gpus, runtime_env=env)
        running[task.remote(m, tasks, settings, trust, endpoint)] = m
    results: dict[str, dict] = {}
    pending = list(running)
    while pending:
        done, pending = ray.wait(pending)
        model = running[done[0]]
        results[model.name] = ray.get(done[0])
        log.info(
            "eval: %s scored in %.0f s (%d/%d)", model.name, results[model.name]["seconds"], len(results), len(models)
        )
    return {m.name: results[m.name] for m in models}
