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
from contextlib import contextmanager
from pathlib import Path

import ray.train
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.tensorboard import SummaryWriter
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


def mark_moe_leaves(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers parameters module by module as hooks fire; an MoE block only runs the experts
    its tokens picked, so ranks disagree on which hooks fire and hang. Leaf modules are gathered whole."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = {type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}
    if blocks:
        set_z3_leaf_modules(model, list(blocks))


@contextmanager
def gathered(engine):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the trainable ones (all of
    them for a full fine-tune, only the adapter for LoRA) so that rank 0 can save whole tensors."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in engine.module.parameters() if p.requires_grad]):
        yield


def save_checkpoint(engine, step: int, history: list, rank: int, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # every rank writes its ZeRO optimizer shard; Ray gathers all ranks' files in one folder
        engine.save_checkpoint(tmp, tag="ds", exclude_frozen_parameters=True)
        with gathered(engine):
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
    if c["zero_stage"] == 3:
        mark_moe_leaves(model)
    ds_config = deepspeed_config(c["batch_size"], c["grad_accum"], c["grad_clip"], c["lr"],
                                 c["zero_stage"], c["use_gpu"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, c["warmup_steps"], c["max_steps"]))
    step, history = resume(engine)
    objective = make_objective(c, device)

    tokens_per_step = c["batch_size"] * c["grad_accum"] * c["seq_len"] * world
    tensorboard = SummaryWriter(c["tensorboard_dir"]) if rank == 0 and c.get("tensorboard_dir") else None
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
                       "grad_norm": round(float(engine.get_global_grad_norm() or 0.0), 5),
                       "tokens_per_s": round(tokens_per_step * len(losses) / c["grad_accum"] / elapsed, 1)}
            history.append(metrics)
            if tensorboard:
                for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    tensorboard.add_scalar(f"train/{name}", metrics[name], step)
                tensorboard.flush()
            losses = []
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} at step {step}")
            if step % c["checkpoint_every"] == 0 or step == c["max_steps"]:
                save_checkpoint(engine, step, history, rank, metrics)
            else:
                ray.train.report(metrics)
