"""The train stage: base model -> each configured stage (pretrain, sft, dpo) in turn on Ray Train,
each starting from the previous one's model.

runs/<name>/train/<stage>/   final/ (model + state), ray/ (checkpoints), tensorboard/, loss.png, metrics.json
runs/<name>/train/final/     the last stage's model: what quantize merges and serves
runs/<name>/train/metrics.json, loss.png   every stage in one place (the hand-off: pipeline.handoff)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import ConfigError, LoraSettings, PipelineConfig, StageSpec
from pipeline.digest import path_digest
from pipeline.handoff import TrainedModel, curated_dir, write_trained
from pipeline.loading import load_model_config, model_from_config
from pipeline.merge import merge_adapter
from pipeline.model import prepare_base_model
from pipeline.plan import make_plan
from pipeline.plots import plot_loss
from pipeline.train.data import stage_datasets
from pipeline.train.fit import fit, history_summary
from pipeline.train.recipe_config import stage_recipe

log = logging.getLogger("pipeline.train")


def check_lora_targets(architecture, lora: LoraSettings, where: str, trust_remote_code: bool) -> None:
    """Fail before any worker starts when a LoRA target names no module (or parameter) of the model;
    `architecture` is its config (no weights are read)."""
    with torch.device("meta"):
        model = model_from_config(AutoModelForCausalLM, architecture, trust_remote_code)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules + lora.modules_to_save if t not in leaves]
    missing += [p for p in lora.target_parameters if not any(n.endswith(p) for n, _ in model.named_parameters())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"train.lora: {missing} not found in {where}; linear modules there: {linear}")


def stage_base(cfg: PipelineConfig, out: Path, spec: StageSpec, previous: TrainedModel | None, base: Path) -> Path:
    """A stage after another starts from its model merged into one (a LoRA stage adds a fresh adapter
    on top), in out/<stage>/base. So each stage's adapter applies to its own base, and DPO's reference,
    the model with the adapter off, is the model the stage started from."""
    if previous is None:
        return base
    merged = out / spec.name / "base"
    shutil.rmtree(merged, ignore_errors=True)
    # a Ray task, not the driver: the driver may run on a small head node (the merge streams, in the base's dtype)
    task = ray.remote(num_cpus=1)(merge_adapter)
    return ray.get(task.remote(previous.base_model, previous.model, merged, None, cfg.model.trust_remote_code, base))


def stage_source(cfg: PipelineConfig, spec: StageSpec) -> Path:
    """What a stage trains on: the curated corpus (pretrain) or its data file."""
    return curated_dir(cfg) if spec.kind == "pretrain" else Path(spec.data)


def stage_data(cfg: PipelineConfig, spec: StageSpec, base: Path) -> dict:
    datasets = stage_datasets(
        spec.kind,
        str(stage_source(cfg, spec)),
        str(base),
        cfg.model.trust_remote_code,
        cfg.model.seq_len,
        cfg.train.padding_free,
        spec.where,
    )
    if spec.kind == "pretrain":  # the curated corpus streams: it can be larger than memory
        return datasets
    # instruction and preference files are tokenized once, here: a bad record fails now, in the driver, with
    # its message, and not in a worker that Ray Train would restart; and epochs do not tokenize again
    return {split: ds.materialize() for split, ds in datasets.items()}


def previous_task(cfg: PipelineConfig, i: int, base: Path) -> dict:
    """The previous stage's data, when it was language modelling (pretrain, sft): its held-out split
    measures forgetting (previous_eval_loss), its training split gives EWC its Fisher."""
    before = cfg.train.stages[i - 1] if i else None
    if before is None or before.kind == "dpo":
        if before and cfg.train.ewc.enabled:
            raise ConfigError(
                f"train.ewc: stage {cfg.train.stages[i].name} follows a dpo stage; EWC measures "
                "the Fisher on language-modelling data (pretrain or sft)"
            )
        return {}
    data = stage_data(cfg, before, base)
    return {"previous_eval": data["eval"], **({"previous": data["train"]} if cfg.train.ewc.enabled else {})}


def planned_micro_batches(cfg: PipelineConfig, base: Path) -> list[int | None]:
    """batch_size=auto on sharded GPUs cannot be probed before sharding: each stage takes the memory plan's."""
    train = cfg.train
    if not (train.batch_size == "auto" and train.use_gpu and train.shards_parameters):
        return [None] * len(train.stages)
    plan = make_plan(cfg, load_model_config(base, cfg.model.trust_remote_code))
    return [s.planned_micro_batch for s in plan.stages]


def run_train(cfg: PipelineConfig, fresh: bool = False) -> dict:
    """`fresh`: discard the checkpoints of earlier runs instead of resuming them."""
    out = cfg.stage_dir("train")
    # a model of one's own needs no corpus unless a stage pretrains on it
    base = prepare_base_model(cfg.model, None if cfg.model.path else curated_dir(cfg), out / "base")
    if not cfg.train.full_finetune:
        trust = cfg.model.trust_remote_code
        check_lora_targets(load_model_config(base, trust), cfg.train.lora, str(base), trust)
    final, summaries, histories = train_stages(cfg, base, out, fresh)
    shutil.rmtree(out / "final", ignore_errors=True)
    shutil.copytree(final.model.parent, out / "final")
    plot_loss(histories, out / "loss.png")
    return write_trained(
        cfg,
        TrainedModel(final.base_model, out / "final" / "model"),
        {"stages": summaries, **history_summary(histories[cfg.train.stages[-1].name])},
    )


def train_stages(
    cfg: PipelineConfig, base: Path, out: Path, fresh: bool
) -> tuple[TrainedModel, list[dict], dict[str, list[dict]]]:
    """cfg.train.stages in turn from `base`, each in out/<stage>/: the last stage's model (and the base
    it applies to), each stage's summary, and each stage's loss history."""
    previous, summaries, histories = None, [], {}
    planned = planned_micro_batches(cfg, base)
    for i, spec in enumerate(cfg.train.stages):
        datasets = {**stage_data(cfg, spec, base), **previous_task(cfg, i, base)}
        start = stage_base(cfg, out, spec, previous, base)
        inputs = {"base_model": path_digest(start), "data": path_digest(stage_source(cfg, spec))}
        if "previous_eval" in datasets:
            inputs["previous_data"] = path_digest(stage_source(cfg, cfg.train.stages[i - 1]))
        recipe = stage_recipe(cfg, spec, start, out / spec.name, i == 0, inputs, planned[i])
        final, history = fit(cfg, recipe, out / spec.name, datasets, fresh)
        summary = {
            "stage": spec.name,
            "kind": spec.kind,
            "base_model": str(start),
            "model": str(final / "model"),
            **history_summary(history),
        }
        (out / spec.name / "metrics.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "train %s: loss %.3f -> %.3f over %d steps%s",
            spec.name,
            summary["loss_first"],
            summary["loss_last"],
            summary["steps"],
            " (stopped early)" if summary["stopped_early"] else "",
        )
        previous, histories[spec.name] = TrainedModel(start, final / "model"), history
        summaries.append({k: v for k, v in summary.items() if k != "history"})
    return previous, summaries, histories
