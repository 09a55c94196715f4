"""Personalization: LoRA adapters trained on the run's own model, each from its own data, and served
beside that model under their names (pipeline/serving/adapters.py).

runs/<name>/adapters/<adapter>/   adapter_config.json, adapter_model.safetensors, pipeline.json (its base):
                                  what the endpoint serves as model <adapter>
                                  manifest.json: base, data, settings, metrics, held-out loss before/after
                                  <stage>/: each stage's training run (checkpoints, TensorBoard, loss.png)

Every adapter of a run trains on the same base, the 16-bit model quantize/merged holds, so all of them
apply to the one copy of it (or its 4-bit export) that a replica serves. An adapter of several stages
(sft, then dpo) trains them as the run's own stages do, each a fresh LoRA on the model so far, and is
served as one adapter: the stages' LoRA stacked (stack_adapters), which is the same change to the base.

The served files are replaced only when the new ones are complete, one file at a time, its config last:
a server keeps answering with the old adapter while a new one trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import AdapterSpec, ConfigError, PipelineConfig
from pipeline.digest import path_digest
from pipeline.handoff import QUANT_REPORT, merged_model_dir
from pipeline.heldout import split_texts
from pipeline.loading import RECORD, load_model_config, load_tokenizer, write_adapter_record
from pipeline.perplexity import adapter_perplexities
from pipeline.train.data import document_matches, instruction_files, instruction_texts
from pipeline.train.stage import check_lora_targets, stage_source, train_stages

log = logging.getLogger("pipeline.adapt")
MANIFEST = "manifest.json"
# copied out of the training run; adapter_config.json last, since its arrival makes the folder an adapter
SERVED_FILES = ("adapter_model.safetensors", RECORD, "adapter_config.json")


def adapter_config(cfg: PipelineConfig, spec: AdapterSpec) -> PipelineConfig:
    """The run's config as an adapter trains: its stages and LoRA settings, never a full fine-tune."""
    lora = spec.lora or cfg.train.lora
    if len(spec.stages) > 1 and lora.target_parameters:
        raise ConfigError(f"adapter {spec.name}: several stages stack LoRA on modules; lora.target_parameters cannot")
    train = cfg.train.model_copy(update={"stages": spec.stages, "lora": lora, "full_finetune": False})
    return cfg.model_copy(update={"train": train})


def identity(adapting: PipelineConfig, base_digest: str, data_digests: list[str]) -> str:
    """What the adapter is made from: the base's and the data's fingerprints and every setting that trains it."""
    what = [base_digest, *data_digests, adapting.train.model_dump(mode="json")]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lora_scale(config: dict) -> float:
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def stack_adapters(stages: list[Path], out: Path) -> Path:
    """One LoRA adapter that changes the first stage's base as the stages' adapters do in turn (each was
    trained on the model merged so far): sum_i s_i B_i A_i = [sqrt(s_i) B_i] [sqrt(s_i) A_i], a LoRA of
    the summed rank with scale 1. A module trained in full (modules_to_save) is the last stage's copy,
    which started from the earlier ones'."""
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in stages]
    tensors = [load_file(p / "adapter_model.safetensors") for p in stages]
    patterned = any(peft.get("rank_pattern") or peft.get("alpha_pattern") for peft in configs)
    if patterned or len({*map(frozenset, tensors)}) > 1:
        raise ConfigError(f"the stages' adapters in {', '.join(map(str, stages))} differ in shape: cannot stack them")
    stacked = {}
    for key in tensors[-1]:
        lora_dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if lora_dim is None:
            stacked[key] = tensors[-1][key]
            continue
        parts = [t[key].float() * math.sqrt(lora_scale(peft)) for t, peft in zip(tensors, configs)]
        stacked[key] = torch.cat(parts, lora_dim).to(tensors[-1][key].dtype).contiguous()
    rank = sum(peft["r"] for peft in configs)
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**configs[-1], "r": rank, "lora_alpha": rank, "use_rslora": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def publish(made: Path, out: Path) -> None:
    """Replace the served files by the new adapter's, each whole at once (copied aside, then renamed
    over), adapter_config.json last: its arrival makes a new folder an adapter."""
    for name in SERVED_FILES:
        part = out / f".{name}.new"
        shutil.copy2(made / name, part)
        os.replace(part, out / name)


def adapters_at_once(cfg: PipelineConfig, n: int, cluster: dict[str, float]) -> int:
    """How many of `n` adapters train at the same time: each needs a worker group (train.num_workers
    workers of train.cpus_per_worker CPUs, and a GPU each with use_gpu), and one CPU stays free for the
    Ray Data tasks and merges that a group waits on (all of them taken by groups, a streaming one hangs)."""
    if cfg.adapters_at_once:
        return min(n, cfg.adapters_at_once)
    train = cfg.train
    groups = (cluster.get("CPU", 0) - 1) // (train.num_workers * train.cpus_per_worker)
    if train.use_gpu:
        groups = min(groups, cluster.get("GPU", 0) // train.num_workers)
    return int(max(1, min(n, groups)))


def run_adapters(cfg: PipelineConfig, names: list[str], fresh: bool = False) -> dict[str, dict]:
    """The named adapters, as many at once as the cluster holds (adapters_at_once); manifests by name."""
    if not names:
        return {}
    at_once = adapters_at_once(cfg, len(names), ray.cluster_resources())
    log.info("adapt: %d adapter(s), %d at a time", len(names), at_once)
    with ThreadPoolExecutor(at_once, thread_name_prefix="adapt") as pool:  # Ray Train runs a fit per thread
        running = {name: pool.submit(run_adapt, cfg, name, fresh) for name in names}
        return {name: future.result() for name, future in running.items()}


def held_out_texts(cfg: PipelineConfig, spec: AdapterSpec) -> list[str]:
    """What an adapter is scored on: the held-out records of its instruction and preference files, or
    (trained on a part of the curated corpus) that part's held-out documents."""
    limit, trust = cfg.quantize.eval_samples, cfg.model.trust_remote_code
    files = instruction_files(spec.stages)
    if files:
        return instruction_texts(files, load_tokenizer(merged_model_dir(cfg), trust), limit, held_out=True)
    part = spec.stages[0]  # a pretrain stage: the others would have files
    return split_texts(stage_source(cfg, part), limit, True, partial(document_matches, where=part.where))


def quantized_check(cfg: PipelineConfig, spec: AdapterSpec, adapter: Path) -> dict | None:
    """The quantize stage's quality gate for an adapter: its held-out perplexity over the 4-bit base the
    endpoint serves against over the 16-bit model it was trained on (quantize.max_ppl_increase). None
    when the run has no 4-bit export. A Ray task, as the quantize stage is: it lands where the models fit."""
    report_path = cfg.stage_dir("quantize") / QUANT_REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if not report.get("quantized"):
        return None
    bases = {"merged": merged_model_dir(cfg), "quantized": report_path.parent / report["quantized"]}
    texts = held_out_texts(cfg, spec)
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(adapter_perplexities)
    ppl = ray.get(task.remote(adapter, bases, texts, cfg.quantize.calib_seq_len, cfg.model.trust_remote_code))
    change = round(ppl["quantized"] / ppl["merged"] - 1, 4)
    check = {
        "eval_documents": len(texts),
        "merged_perplexity": ppl["merged"],
        "quantized_perplexity": ppl["quantized"],
        "perplexity_change": change,
        "max_ppl_increase": cfg.quantize.max_ppl_increase,
        "passed": change <= cfg.quantize.max_ppl_increase,
    }
    if not check["passed"]:
        log.warning(
            "adapt %s: on the 4-bit base its held-out perplexity rose %+.2f%% (%.3f -> %.3f), over the "
            "%.2f%% of quantize.max_ppl_increase; it is served, and answers worse than on the 16-bit model",
            spec.name,
            100 * change,
            ppl["merged"],
            ppl["quantized"],
            100 * cfg.quantize.max_ppl_increase,
        )
    return check


def run_adapt(cfg: PipelineConfig, name: str, fresh: bool = False) -> dict:
    """Train one adapter (unless one made from the same inputs and settings is there); its manifest."""
    spec, base, out = cfg.adapter(name), merged_model_dir(cfg), cfg.stage_dir("adapters") / name
    adapting = adapter_config(cfg, spec)
    sources = [stage_source(cfg, stage) for stage in spec.stages]
    base_digest, data_digests = path_digest(base), [path_digest(source) for source in sources]
    made_from = identity(adapting, base_digest, data_digests)
    if not fresh and (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest["identity"] == made_from:
            log.info("adapt %s: done earlier from the same base, data and settings (%s)", name, out)
            return manifest
    trust = cfg.model.trust_remote_code
    check_lora_targets(load_model_config(base, trust), adapting.train.lora, str(base), trust)
    started = time.time()
    trained, summaries, _ = train_stages(adapting, base, out, fresh)
    made = trained.model
    if len(summaries) > 1:
        made = stack_adapters([Path(s["model"]) for s in summaries], out / "stacked")
        write_adapter_record(made, base, base_digest)
    publish(made, out)
    manifest = {
        "adapter": name,
        "identity": made_from,
        "base_model": str(base),
        "base_digest": base_digest,
        "stages": [
            {"name": stage.name, "kind": stage.kind, "data": str(source), "where": stage.where, "data_digest": digest}
            for stage, source, digest in zip(spec.stages, sources, data_digests)
        ],
        "lora": adapting.train.lora.model_dump(mode="json"),
        "rank": json.loads((made / "adapter_config.json").read_text())["r"],
        "metrics": summaries,
        "trained": {"started": started, "finished": time.time()},
        "quantized_base": quantized_check(cfg, spec, made),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for summary in summaries:
        log.info(
            "adapt %s, %s: held-out loss %s -> %s",
            name,
            summary["stage"],
            summary.get("eval_loss_before"),
            summary.get("eval_loss_last"),
        )
    return manifest
