"""The train stage: base model -> each configured stage (pretrain, sft, dpo) in turn on Ray Train,
each starting from the previous one's model.

runs/<name>/train/<stage>/   final/ (model + state), ray/ (checkpoints), tensorboard/, loss.png, metrics.json
runs/<name>/train/final/     the last stage's model: what quantize merges and serves
runs/<name>/train/metrics.json, loss.png   every stage in one place
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.config import ConfigError, PipelineConfig, StageSpec
from pipeline.model import prepare_base_model
from pipeline.plots import plot_loss
from pipeline.train.data import stage_datasets
from pipeline.train.recipe import train_loop

log = logging.getLogger("pipeline.train")


def check_lora_targets(model_dir: Path, targets: list[str], parameters: list[str]) -> None:
    """Fail before any worker starts when a LoRA target names no module (or parameter) of the model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))  # config only: no weights
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    missing += [p for p in parameters if not any(n.endswith(p) for n, _ in model.named_parameters())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"train.lora: {missing} not found in {model_dir}; linear modules there: {linear}")


def loop_config(cfg: PipelineConfig, base: Path) -> dict:
    """The recipe's settings for a plain pretraining run of cfg.train (stages and distillation adjust it)."""
    t = cfg.train
    return {"base_model": str(base), "trust_remote_code": cfg.model.trust_remote_code, "seq_len": cfg.model.seq_len, "use_gpu": t.use_gpu, "seed": t.seed,
            "objective": "causal_lm", "beta": 0.0, "lr": t.lr, "warmup_steps": t.warmup_steps,
            "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "grad_clip": t.grad_clip,
            "strategy": t.strategy, "zero_stage": t.zero_stage, "offload_optimizer": t.offload_optimizer,
            "deepspeed_config": t.deepspeed_config, "precision": t.precision,
            "gradient_checkpointing": t.gradient_checkpointing, "router_aux_loss_coef": t.router_aux_loss_coef,
            "log_every": t.log_every, "checkpoint_every": t.checkpoint_every, "eval_every": t.eval_every,
            "eval_batches": t.eval_batches, "early_stopping_patience": t.early_stopping_patience,
            "early_stopping_min_delta": t.early_stopping_min_delta, "profile": t.profile,
            "inject_fault_at_step": t.inject_fault_at_step, "track_previous": False, "ewc_weight": 0.0, "ewc_batches": t.ewc.fisher_batches,
            "lora_r": None if t.full_finetune else t.lora.r, "lora_alpha": t.lora.alpha, "lora_dropout": t.lora.dropout,
            "lora_targets": t.lora.target_modules, "lora_target_parameters": t.lora.target_parameters,
            "lora_modules_to_save": t.lora.modules_to_save}


def stage_loop(cfg: PipelineConfig, spec: StageSpec, base: Path, first: bool) -> dict:
    t = cfg.train
    return {**loop_config(cfg, base), "objective": "dpo" if spec.kind == "dpo" else "causal_lm", "beta": spec.beta,
            "max_steps": spec.max_steps or t.max_steps, "lr": spec.lr or t.lr,
            "ewc_weight": t.ewc.weight if t.ewc.enabled and not first else 0.0}


def stage_base(cfg: PipelineConfig, spec: StageSpec, previous: tuple[Path, Path] | None, base: Path) -> Path:
    """A stage after another starts from its model merged into one (a LoRA stage adds a fresh adapter
    on top). So each stage's adapter applies to its own base, and DPO's reference, the model with the
    adapter off, is the model the stage started from."""
    if previous is None:
        return base
    from pipeline.export.merge import merge_adapter

    merged = cfg.stage_dir("train") / spec.name / "base"
    shutil.rmtree(merged, ignore_errors=True)
    return merge_adapter(previous[0], previous[1], merged, torch.float32, tokenizer_dir=base)


def checkpoint_storage(cfg: PipelineConfig, out: Path) -> str:
    uri = cfg.train.checkpoint_uri
    # beside the stage folders, not in them: a stage folder pushed to a URI replaces what was there
    return f"{uri.rstrip('/')}/checkpoints/{out.relative_to(cfg.stage_dir('train').parent)}" if uri else str(out / "ray")


def run_name(cfg: PipelineConfig, loop: dict, out: Path) -> str:
    """Ray Train resumes a run of the same name from its latest checkpoint. Naming it after the
    loop config means a resubmitted job picks up where it died, while a changed config starts fresh
    instead of loading checkpoints that do not fit it."""
    digest = hashlib.sha256(json.dumps(loop, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{out.name}-{digest}"


def fit(cfg: PipelineConfig, loop: dict, out: Path, datasets: dict) -> tuple[Path, list[dict]]:
    """Run the recipe on Ray Train; return the final checkpoint folder (out/final) and the logged
    history. Rank 0 writes TensorBoard scalars to out/tensorboard (and profiler traces to out/profile)."""
    loop = {**loop, "tensorboard_dir": str(out / "tensorboard"), "profile_dir": str(out / "profile")}
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(name=run_name(cfg, {k: v for k, v in loop.items() if k != "profile_dir"}, out),
                             storage_path=checkpoint_storage(cfg, out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    history = json.loads((final / "state.json").read_text())["history"]
    plot_loss({out.name: history}, out / "loss.png")
    return final, history


def history_summary(history: list[dict]) -> dict:
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    previous = [h["previous_eval_loss"] for h in history if "previous_eval_loss" in h]
    return {"steps": history[-1]["step"], "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            **({"eval_loss_best": min(evals), "eval_loss_last": evals[-1]} if evals else {}),
            **({"previous_eval_loss_last": previous[-1]} if previous else {}),
            "stopped_early": any(h.get("stopped_early") for h in history),
            "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1), "history": history}


def require_curated(cfg: PipelineConfig) -> Path:
    kept = cfg.stage_dir("curate") / "kept"
    if not kept.is_dir():
        raise FileNotFoundError(f"no curated data at {kept}: run `pipeline curate` first")
    return kept


def stage_data(cfg: PipelineConfig, spec: StageSpec, base: Path) -> dict:
    source = str(require_curated(cfg)) if spec.kind == "pretrain" else spec.data
    return stage_datasets(spec.kind, source, str(base), cfg.model.seq_len)


def previous_task(cfg: PipelineConfig, i: int, base: Path) -> dict:
    """The previous stage's data, when it was language modelling (pretrain, sft): its held-out split
    measures forgetting (previous_eval_loss), its training split gives EWC its Fisher."""
    before = cfg.train.stages[i - 1] if i else None
    if before is None or before.kind == "dpo":
        if before and cfg.train.ewc.enabled:
            raise ConfigError(f"train.ewc: stage {cfg.train.stages[i].name} follows a dpo stage; EWC measures "
                              "the Fisher on language-modelling data (pretrain or sft)")
        return {}
    data = stage_data(cfg, before, base)
    return {"previous_eval": data["eval"], **({"previous": data["train"]} if cfg.train.ewc.enabled else {})}


def run_train(cfg: PipelineConfig) -> dict:
    out = cfg.stage_dir("train")
    base = prepare_base_model(cfg.model, require_curated(cfg), out / "base")
    if not cfg.train.full_finetune:
        lora = cfg.train.lora
        check_lora_targets(base, lora.target_modules + lora.modules_to_save, lora.target_parameters)
    previous, summaries, histories = None, [], {}
    for i, spec in enumerate(cfg.train.stages):
        datasets = {**stage_data(cfg, spec, base), **previous_task(cfg, i, base)}
        start = stage_base(cfg, spec, previous, base)
        loop = {**stage_loop(cfg, spec, start, first=i == 0), "track_previous": "previous_eval" in datasets}
        final, history = fit(cfg, loop, out / spec.name, datasets)
        summary = {"stage": spec.name, "kind": spec.kind, "base_model": str(start), "model": str(final / "model"),
                   **history_summary(history)}
        (out / spec.name / "metrics.json").write_text(json.dumps(summary, indent=2))
        log.info("train %s: loss %.3f -> %.3f over %d steps%s", spec.name, summary["loss_first"],
                 summary["loss_last"], summary["steps"], " (stopped early)" if summary["stopped_early"] else "")
        previous, histories[spec.name] = (start, final / "model"), history
        summaries.append({k: v for k, v in summary.items() if k != "history"})
    shutil.rmtree(out / "final", ignore_errors=True)
    shutil.copytree(final, out / "final")
    plot_loss(histories, out / "loss.png")
    result = {"base_model": str(previous[0]), "adapter": str(out / "final" / "model"), "stages": summaries,
              **{k: v for k, v in history_summary(histories[spec.name]).items()}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
