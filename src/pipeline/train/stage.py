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

import torch
from transformers import AutoModelForCausalLM

from pipeline.config import ConfigError, PipelineConfig, StageSpec
from pipeline.handoff import TrainedModel, curated_dir, write_trained
from pipeline.loading import load_model_config
from pipeline.merge import merge_adapter
from pipeline.model import prepare_base_model
from pipeline.plots import plot_loss
from pipeline.train.data import stage_datasets
from pipeline.train.fit import fit, history_summary
from pipeline.train.recipe_config import stage_recipe

log = logging.getLogger("pipeline.train")


def check_lora_targets(model_dir: Path, targets: list[str], parameters: list[str], trust_remote_code: bool) -> None:
    """Fail before any worker starts when a LoRA target names no module (or parameter) of the model."""
    with torch.device("meta"):  # config only: no weights
        model = AutoModelForCausalLM.from_config(
            load_model_config(model_dir, trust_remote_code), trust_remote_code=trust_remote_code
        )
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    missing += [p for p in parameters if not any(n.endswith(p) for n, _ in model.named_parameters())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"train.lora: {missing} not found in {model_dir}; linear modules there: {linear}")


def stage_base(cfg: PipelineConfig, spec: StageSpec, previous: TrainedModel | None, base: Path) -> Path:
    """A stage after another starts from its model merged into one (a LoRA stage adds a fresh adapter
    on top). So each stage's adapter applies to its own base, and DPO's reference, the model with the
    adapter off, is the model the stage started from."""
    if previous is None:
        return base
    merged = cfg.stage_dir("train") / spec.name / "base"
    shutil.rmtree(merged, ignore_errors=True)
    return merge_adapter(
        previous.base_model, previous.model, merged, torch.float32, cfg.model.trust_remote_code, tokenizer_dir=base
    )


def stage_data(cfg: PipelineConfig, spec: StageSpec, base: Path) -> dict:
    source = str(curated_dir(cfg)) if spec.kind == "pretrain" else spec.data
    return stage_datasets(
        spec.kind, source, str(base), cfg.model.trust_remote_code, cfg.model.seq_len, cfg.train.padding_free
    )


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


def run_train(cfg: PipelineConfig) -> dict:
    out = cfg.stage_dir("train")
    base = prepare_base_model(cfg.model, curated_dir(cfg), out / "base")
    if not cfg.train.full_finetune:
        lora = cfg.train.lora
        check_lora_targets(
            base, lora.target_modules + lora.modules_to_save, lora.target_parameters, cfg.model.trust_remote_code
        )
    previous, summaries, histories = None, [], {}
    for i, spec in enumerate(cfg.train.stages):
        datasets = {**stage_data(cfg, spec, base), **previous_task(cfg, i, base)}
        start = stage_base(cfg, spec, previous, base)
        recipe = stage_recipe(
            cfg, spec, start, out / spec.name, first=i == 0, track_previous="previous_eval" in datasets
        )
        final, history = fit(cfg, recipe, out / spec.name, datasets)
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
    shutil.rmtree(out / "final", ignore_errors=True)
    shutil.copytree(final, out / "final")
    plot_loss(histories, out / "loss.png")
    return write_trained(
        cfg,
        TrainedModel(previous.base_model, out / "final" / "model"),
        {"stages": summaries, **history_summary(histories[spec.name])},
    )
