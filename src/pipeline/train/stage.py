"""The train stage: base model + packed data -> Ray Train TorchTrainer running the recipe."""
from __future__ import annotations

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
            "lr": t.lr, "warmup_steps": t.warmup_steps, "max_steps": t.max_steps, "batch_size": t.batch_size,
            "grad_accum": t.grad_accum, "grad_clip": t.grad_clip, "zero_stage": t.zero_stage,
            "log_every": t.log_every, "checkpoint_every": t.checkpoint_every,
            "lora_r": t.lora.r, "lora_alpha": t.lora.alpha, "lora_dropout": t.lora.dropout,
            "lora_targets": t.lora.target_modules, "lora_modules_to_save": t.lora.modules_to_save}


def run_train(cfg: PipelineConfig) -> dict:
    kept = cfg.stage_dir("curate") / "kept"
    if not kept.is_dir():
        raise FileNotFoundError(f"no curated data at {kept}: run `pipeline curate` first")
    out = cfg.stage_dir("train")
    base = prepare_base_model(cfg.model, kept, out / "base")
    check_lora_targets(base, cfg.train.lora.target_modules + cfg.train.lora.modules_to_save)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, base),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets={"train": packed_dataset(str(kept), str(base), cfg.model.seq_len)},
        run_config=RunConfig(name=f"{cfg.name}-train", storage_path=str(out / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    history = json.loads((final / "state.json").read_text())["history"]
    summary = {"base_model": str(base), "adapter": str(final / "adapter"), "steps": history[-1]["step"],
               "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
               "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1),
               "history": history}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot_loss(history, out / "loss.png")
    log.info("train: loss %.3f -> %.3f over %d steps; adapter in %s",
             summary["loss_first"], summary["loss_last"], summary["steps"], summary["adapter"])
    return summary
