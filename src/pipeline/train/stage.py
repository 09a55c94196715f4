"""The train stage: base model + packed data -> Ray Train TorchTrainer running the recipe."""
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

from pipeline.config import ConfigError, PipelineConfig
from pipeline.model import prepare_base_model
from pipeline.plots import plot_loss
from pipeline.train.data import packed_dataset
from pipeline.train.recipe import train_loop

log = logging.getLogger("pipeline.train")


def check_lora_targets(model_dir: Path, targets: list[str]) -> None:
    """Fail before any worker starts when a LoRA target names no module of the model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"train.lora.target_modules: {missing} not found in {model_dir}; "
                          f"linear modules there: {linear}")


def loop_config(cfg: PipelineConfig, base: Path) -> dict:
    t = cfg.train
    return {"base_model": str(base), "seq_len": cfg.model.seq_len, "use_gpu": t.use_gpu, "seed": t.seed,
            "objective": "causal_lm", "lr": t.lr, "warmup_steps": t.warmup_steps, "max_steps": t.max_steps,
            "batch_size": t.batch_size, "grad_accum": t.grad_accum, "grad_clip": t.grad_clip,
            "zero_stage": t.zero_stage, "log_every": t.log_every, "checkpoint_every": t.checkpoint_every,
            "lora_r": None if t.full_finetune else t.lora.r, "lora_alpha": t.lora.alpha, "lora_dropout": t.lora.dropout,
            "lora_targets": t.lora.target_modules, "lora_modules_to_save": t.lora.modules_to_save}


def checkpoint_storage(cfg: PipelineConfig, out: Path) -> str:
    uri = cfg.train.checkpoint_uri
    # beside the stage folders, not in them: a stage folder pushed to a URI replaces what was there
    return f"{uri.rstrip('/')}/checkpoints/{out.name}" if uri else str(out / "ray")


def run_name(cfg: PipelineConfig, loop: dict, out: Path) -> str:
    """Ray Train resumes a run of the same name from its latest checkpoint. Naming it after the
    loop config means a resubmitted job picks up where it died, while a changed config starts fresh
    instead of loading checkpoints that do not fit it."""
    digest = hashlib.sha256(json.dumps(loop, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{out.name}-{digest}"


def fit(cfg: PipelineConfig, loop: dict, out: Path) -> tuple[Path, list[dict]]:
    """Run the recipe on Ray Train over the curated training split; return the final checkpoint
    folder (out/final) and the logged history. Rank 0 writes TensorBoard scalars to out/tensorboard."""
    loop = {**loop, "tensorboard_dir": str(out / "tensorboard")}
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": packed_dataset(str(cfg.stage_dir("curate") / "kept"), loop["base_model"], cfg.model.seq_len)},
        run_config=RunConfig(name=run_name(cfg, loop, out), storage_path=checkpoint_storage(cfg, out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    history = json.loads((final / "state.json").read_text())["history"]
    plot_loss(history, out / "loss.png")
    return final, history


def history_summary(history: list[dict]) -> dict:
    return {"steps": history[-1]["step"], "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1), "history": history}


def require_curated(cfg: PipelineConfig) -> Path:
    kept = cfg.stage_dir("curate") / "kept"
    if not kept.is_dir():
        raise FileNotFoundError(f"no curated data at {kept}: run `pipeline curate` first")
    return kept


def run_train(cfg: PipelineConfig) -> dict:
    out = cfg.stage_dir("train")
    base = prepare_base_model(cfg.model, require_curated(cfg), out / "base")
    if not cfg.train.full_finetune:
        check_lora_targets(base, cfg.train.lora.target_modules + cfg.train.lora.modules_to_save)
    final, history = fit(cfg, loop_config(cfg, base), out)
    summary = {"base_model": str(base), "adapter": str(final / "model"), **history_summary(history)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("train: loss %.3f -> %.3f over %d steps; model in %s",
             summary["loss_first"], summary["loss_last"], summary["steps"], summary["adapter"])
    return summary
