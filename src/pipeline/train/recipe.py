"""The training recipe: what every Ray Train worker runs. Reads top to bottom like one script.

model (HF dir) -> LoRA (peft) or full -> DeepSpeed ZeRO engine (AdamW, cosine LR, grad clip) ->
loop over this worker's shard of the packed dataset minimizing the objective (next-token CE or
distillation) -> report loss, checkpoint every N steps.
A restarted worker resumes model, optimizer, scheduler and step from the latest checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import ray.train
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from pipeline.train.objectives import make_objective
from pipeline.train.strategy import deepspeed_config


def build_model(c: dict) -> torch.nn.Module:
    """The base with LoRA adapters, or the whole model trainable when `lora_r` is None."""
    model = AutoModelForCausalLM.from_pretrained(c["base_model"], dtype=torch.float32)
    if hasattr(model.config, "router_aux_loss_coef"):
        model.config.output_router_logits = True  # adds the router load-balancing loss to `loss`
    if c["lora_r"] is None:
        return model
    lora = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"],
                      target_modules=c["lora_targets"], modules_to_save=c["lora_modules_to_save"] or None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def save_checkpoint(engine, step: int, history: list, rank: int, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # every rank writes its ZeRO optimizer shard; Ray gathers all ranks' files in one folder
        engine.save_checkpoint(tmp, tag="ds", exclude_frozen_parameters=True)
        if rank == 0:
            engine.module.save_pretrained(Path(tmp) / "model")  # the adapter, or the whole model
            (Path(tmp) / "state.json").write_text(json.dumps({"step": step, "history": history}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def resume(engine) -> tuple[int, list]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag="ds", load_module_strict=False)
        state = json.loads((Path(d) / "state.json").read_text())
    return state["step"], state["history"]


def batches(shard, batch_size: int):
    """Endless stream of micro-batches: the data is re-read epoch after epoch."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long, drop_last=True):
            yield batch["input_ids"]


def train_loop(c: dict) -> None:
    if not c["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator on import

    torch.manual_seed(c["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if c["use_gpu"] else torch.device("cpu")

    model = build_model(c)
    ds_config = deepspeed_config(c["batch_size"], c["grad_accum"], c["grad_clip"], c["lr"],
                                 c["zero_stage"], c["use_gpu"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, c["warmup_steps"], c["max_steps"]))
    step, history = resume(engine)
    objective = make_objective(c, device)

    tokens_per_step = c["batch_size"] * c["grad_accum"] * c["seq_len"] * world
    data = batches(ray.train.get_dataset_shard("train"), c["batch_size"])
    t_last, losses = time.time(), []
    while step < c["max_steps"]:
        for _ in range(c["grad_accum"]):
            input_ids = next(data).to(device)
            loss = objective(engine, input_ids)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        step += 1
        if step % c["log_every"] == 0 or step == c["max_steps"] or step % c["checkpoint_every"] == 0:
            mean = torch.stack(losses).mean()
            torch.distributed.all_reduce(mean)  # gloo has no AVG
            mean /= world
            elapsed, t_last = time.time() - t_last, time.time()
            metrics = {"step": step, "loss": round(mean.item(), 5), "lr": engine.get_lr()[0],
                       "tokens_per_s": round(tokens_per_step * len(losses) / c["grad_accum"] / elapsed, 1)}
            history.append(metrics)
            losses = []
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} at step {step}")
            if step % c["checkpoint_every"] == 0 or step == c["max_steps"]:
                save_checkpoint(engine, step, history, rank, metrics)
            else:
                ray.train.report(metrics)
