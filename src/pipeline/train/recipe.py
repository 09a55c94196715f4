"""The training recipe: what every Ray Train worker runs. Reads top to bottom like one script.

model (HF dir: the base, or the previous stage's model merged) -> LoRA (peft) or full -> engine (DeepSpeed ZeRO,
FSDP2 or DDP: AdamW, cosine LR, grad clip, mixed precision) -> loop over this worker's shard of the
stage's data minimizing the objective (+ EWC) -> eval loss every N steps with early stopping ->
report metrics, checkpoint every N steps. A restarted worker resumes model, optimizer, scheduler,
step and data position from the latest checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import ray.train
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM

from pipeline.config import TrainConfig
from pipeline.errors import CheckpointDamagedError
from pipeline.loading import Checkpoint, load_model, load_model_config, model_from_config
from pipeline.train import fused_loss
from pipeline.train.batch_size import choose_batch_size
from pipeline.train.checkpoint_manifest import candidates, damage, write_manifest
from pipeline.train.ewc import EWC
from pipeline.train.jit_ops import guard_op_loads
from pipeline.train.memory import LoadMeter, peak_memory, return_freed_memory
from pipeline.train.objectives import causal_lm, make_objective
from pipeline.train.recipe_config import RecipeConfig
from pipeline.train.strategy import autocast_dtype, build_engine, partitioned_loading, place
from pipeline.train.streamed_load import (
    ConvertedCheckpoint,
    Source,
    empty_model,
    fill_partitions,
    rank0_source,
    streams,
)

log = logging.getLogger("pipeline.train")


def attention_kernel(train: TrainConfig) -> str:
    if train.attention != "auto":
        return train.attention
    flash = train.use_gpu and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def load_dtype(train: TrainConfig) -> torch.dtype:
    """With mixed precision, a frozen base (LoRA) lives in the 16-bit dtype on every strategy, half the
    memory of fp32, and DeepSpeed keeps even a fully trained model in it (its optimizer holds the fp32
    master copy). DDP and FSDP2 keep a fully trained model in fp32 as their master copy and cast for
    compute. What trains is fp32 on DDP and FSDP2 either way (`train_in_fp32`)."""
    half = autocast_dtype(train)
    if half is None or (train.full_finetune and train.strategy != "deepspeed"):
        return torch.float32
    return half


def train_in_fp32(model: torch.nn.Module, train: TrainConfig) -> None:
    """DDP and FSDP2 step the optimizer on the parameters themselves: the trainable ones (LoRA adapters,
    modules_to_save copies of a 16-bit base) are made fp32. DeepSpeed keeps its own fp32 master copy."""
    if train.strategy == "deepspeed":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class Built(NamedTuple):
    model: torch.nn.Module
    source: Source | None  # FSDP2, rank 0: where strategy.place reads the whole tensors it sends the workers
    streamed: bool  # the checkpoint went into the shards a module at a time


def build_model(config: RecipeConfig) -> Built:
    """The stage's base with LoRA adapters, or the whole model trainable for a full fine-tune.

    Sharded runs (ZeRO-3, FSDP2) stream a checkpoint that holds every parameter (under its own name, or
    fused from per-expert tensors as transformers does) into the shards, a module at a time
    (streamed_load.py). Other checkpoints load through `from_pretrained`: under ZeRO-3 into partitions,
    under FSDP2 on rank 0 alone, whole."""
    trust, train = config.model.trust_remote_code, config.train
    architecture = load_model_config(config.base_model, trust)
    if hasattr(architecture, "router_aux_loss_coef"):
        architecture.output_router_logits = True  # adds the router's load-balancing loss to `loss`
        if train.router_aux_loss_coef is not None:
            architecture.router_aux_loss_coef = train.router_aux_loss_coef
    kwargs = {"dtype": load_dtype(train), "attn_implementation": attention_kernel(train)}
    fsdp, rank = train.strategy == "fsdp", dist.get_rank() if dist.is_initialized() else 0
    checkpoint = streamable_checkpoint(config, architecture, kwargs)
    empty = fsdp and dist.is_initialized() and (checkpoint is not None or rank > 0)
    with partitioned_loading(train):
        if empty:
            model = empty_model(architecture, trust, **kwargs)
        elif checkpoint is not None:  # ZeRO-3: partitioned as it is built (deepspeed.zero.Init), then filled
            model = model_from_config(AutoModelForCausalLM, architecture, trust, **kwargs)
            fill_partitions(model, checkpoint)
        else:
            model = load_model(AutoModelForCausalLM, config.base_model, trust, config=architecture, **kwargs)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = config.lora
        if lora is not None:
            model = get_peft_model(model, lora.peft_config())
    train_in_fp32(model, train)
    source = rank0_source(model, checkpoint) if fsdp and rank == 0 and dist.is_initialized() else None
    if train.compile:  # layer by layer, as torchtitan does: small graphs, and the shards stay outside them
        for layer in decoder_layers(model):
            layer.compile()
    if rank == 0 and train.shards_parameters:
        how = "streamed into the shards" if checkpoint is not None else "loaded whole by from_pretrained"
        log.info("%s: %s", config.base_model, how)
    return Built(model, source, checkpoint is not None)


def streamable_checkpoint(config: RecipeConfig, architecture, kwargs: dict) -> Checkpoint | ConvertedCheckpoint | None:
    """The base's checkpoint, as the model names its parameters, when a sharded run can stream it: it holds
    every parameter, under the model's own name or the names transformers converts from."""
    if not (config.train.shards_parameters and dist.is_initialized()):
        return None
    checkpoint = Checkpoint(config.base_model)
    if not checkpoint.file_of:
        return None  # load_model says why it cannot load it
    skeleton = empty_model(architecture, config.model.trust_remote_code, **kwargs)
    view = ConvertedCheckpoint(checkpoint, skeleton)
    return view if streams(skeleton, view) else None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder().layers


def speed_switches(model: torch.nn.Module, config: RecipeConfig, device: torch.device) -> dict:
    """Installs the fused cross-entropy where asked (and where the objective reads no logits); returns
    what this run uses, for the log and the first step's metrics."""
    fused = config.train.fused_cross_entropy and config.objective == "causal_lm"
    return {
        "attention": model.config._attn_implementation,
        "compile": config.train.compile,
        "cross_entropy": fused_loss.install(model, device) if fused else "full_logits",
    }


@dataclass
class State:
    """What a checkpoint restores besides the engine's own state."""

    step: int = 0
    micro_batches: int = 0  # this worker's position in its data stream
    history: list = field(default_factory=list)
    best_eval: float = math.inf
    evals_without_gain: int = 0
    stopped_early: bool = False
    resumed_at: list = field(default_factory=list)  # the step of each restart from a checkpoint
    passed_over: list = field(default_factory=list)  # damaged checkpoints a restart did not load, and why

    def record_eval(self, loss: float, train: TrainConfig) -> None:
        if loss < self.best_eval - train.early_stopping_min_delta:
            self.best_eval, self.evals_without_gain = loss, 0
        else:
            self.evals_without_gain += 1
        patience = train.early_stopping_patience
        self.stopped_early = patience > 0 and self.evals_without_gain >= patience


def resume(engine) -> State:
    """From the latest checkpoint, or the newest whole one before it when that one is damaged."""
    damaged = []
    for checkpoint in candidates(ray.train.get_checkpoint()):
        with checkpoint.as_directory() as d:
            if problem := damage(Path(d)):
                damaged.append(f"{Path(checkpoint.path).name}: {problem}")
                continue
            engine.load(d)
            state = State(**json.loads((Path(d) / "state.json").read_text()))
        if damaged and dist.get_rank() == 0:
            log.warning("passed over damaged checkpoints (%s); resuming from step %d", "; ".join(damaged), state.step)
        state.resumed_at.append(state.step)
        state.passed_over.extend(damaged)
        return state
    if damaged:
        raise CheckpointDamagedError(
            f"no whole checkpoint to resume from in {Path(checkpoint.path).parent}: {'; '.join(damaged)} "
            "(--fresh starts the stage over)"
        )
    return State()


@contextmanager
def as_saved(model: torch.nn.Module):
    """The model's config as a trained model is saved with it: the MoE router's logits are a training
    output (build_model asks for them, for the balancing loss). A saved config that asks for them breaks
    every batched generate: transformers then computes that loss over each decode step against the whole
    attention mask, and the shapes differ."""
    config = getattr(model, "config", None)
    asked = bool(getattr(config, "output_router_logits", False))
    if asked:
        config.output_router_logits = False
    try:
        yield
    finally:
        if asked:
            config.output_router_logits = True


def save_checkpoint(engine, state: State, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine.save(tmp)  # every rank writes its shard; Ray gathers all ranks' files in one folder
        with as_saved(engine.module):
            engine.save_model(Path(tmp) / "model")  # the adapter, or the whole model
        if dist.get_rank() == 0:
            (Path(tmp) / "state.json").write_text(json.dumps(asdict(state)))
        write_manifest(Path(tmp), dist.get_rank(), dist.get_world_size())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def batches(shard, batch_size: int, device: torch.device, skip: int = 0):
    """Endless stream of micro-batches (the data is re-read epoch after epoch), after skipping the
    `skip` this worker consumed before a restart."""
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long, drop_last=True):
            empty = False
            if skip:
                skip -= 1
                continue
            yield {k: v.to(device) for k, v in batch.items()}
        if empty:
            raise ValueError(
                f"an epoch of the training data gave this worker no micro-batch of {batch_size} rows: "
                "the stage's data is too small for batch_size x num_workers"
            )


def first_batches(shard, n: int, batch_size: int, device: torch.device) -> list[dict]:
    """Up to n micro-batches, read once (held-out data, or the previous stage's data for EWC)."""
    stream = shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long)
    return [{k: v.to(device) for k, v in batch.items()} for _, batch in zip(range(n), stream)]


def collective_device() -> torch.device:
    """Where tensors must be for all_reduce: NCCL reduces GPU tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def evaluate(engine, objective, held_out: list[dict]) -> float | None:
    """Mean loss over the held-out micro-batches of every worker (None when there are none)."""
    engine.train(False)
    total = torch.zeros(2, device=collective_device())
    for batch in held_out:
        total += torch.stack([objective(engine, batch)[0].float().to(total.device), total.new_ones(())])
    engine.train(True)
    dist.all_reduce(total)
    return round((total[0] / total[1]).item(), 5) if total[1] else None


PROGRESS = "progress.json"  # rank 0's last logged step, for the driver's progress bar (fit.py)


class Meter:
    """Averages the loss and the objective's scalars over logging windows, across workers; writes TensorBoard
    and the step reached (PROGRESS)."""

    def __init__(self, output_dir: str | None, rank: int, tokens_per_micro_batch: int):
        self.values: dict[str, list] = {}
        self.tokens, self.t0 = tokens_per_micro_batch * dist.get_world_size(), time.time()
        self.writer = SummaryWriter(Path(output_dir) / "tensorboard") if rank == 0 and output_dir else None
        self.progress = Path(output_dir) / PROGRESS if self.writer else None

    def add(self, loss: torch.Tensor, stats: dict) -> None:
        for name, value in {"loss": loss, **stats}.items():
            self.values.setdefault(name, []).append(value.detach().float())  # no host sync per micro-batch

    def flush(self, step: int, engine, extra: dict) -> dict:
        names = sorted(self.values)
        means = torch.stack([torch.stack(self.values[n]).mean() for n in names]).to(collective_device())
        dist.all_reduce(means)  # gloo has no AVG
        means /= dist.get_world_size()
        micro_batches, elapsed = len(self.values["loss"]), time.time() - self.t0
        metrics = {
            "step": step,
            **{n: round(m.item(), 5) for n, m in zip(names, means)},
            "lr": engine.lr,
            "grad_norm": round(engine.grad_norm, 5),
            "tokens_per_s": round(self.tokens * micro_batches / elapsed, 1),
            **peak_memory(collective_device()),
            **extra,
        }
        if self.writer:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{'eval' if name.startswith('eval') else 'train'}/{name}", value, step)
            self.writer.flush()
            self.progress.write_text(json.dumps({"step": step, "loss": metrics["loss"]}))
        self.values = {}
        return metrics

    def restart_clock(self) -> None:
        """After reporting: the next window's tokens/s leaves out checkpoint writing and evaluation."""
        self.t0 = time.time()


def profiler(config: RecipeConfig, rank: int):
    """train.profile: rank 0 traces steps 2-4 (after one warm-up) for TensorBoard's profiler view."""
    if not (config.train.profile and rank == 0 and config.output_dir):
        return nullcontext(None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if config.train.use_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(Path(config.output_dir) / "profile")),
    )


def train_loop(config: RecipeConfig) -> None:
    train = config.train
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR: DeepSpeed picks its accelerator on import)

    if train.strategy == "deepspeed":
        guard_op_loads()
    torch.manual_seed(train.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device("cuda", ctx.get_local_rank()) if train.use_gpu else torch.device("cpu")

    if train.shards_parameters:  # where holding no whole model is the point; it costs speed (memory.py)
        return_freed_memory()
    with LoadMeter(device) as load:
        built = build_model(config)
        model = place(built.model, built.source, train, device)
    loaded = load.report(model, collective_device())
    switches = speed_switches(model, config, device)
    if rank == 0:
        log.info("%s; training with %s", loaded.describe(), ", ".join(f"{k}={v}" for k, v in switches.items()))
    micro = choose_batch_size(model, train, config.model.seq_len, device, config.planned_micro_batch)
    objective = make_objective(config, device)
    ewc = config.ewc and EWC(
        model,
        causal_lm,
        first_batches(ray.train.get_dataset_shard("previous"), train.ewc.fisher_batches, micro, device),
        train.ewc.weight,
    )
    engine = build_engine(model, train, micro, device)
    state = resume(engine)
    data = batches(ray.train.get_dataset_shard("train"), micro, device, skip=state.micro_batches)
    held_out = first_batches(ray.train.get_dataset_shard("eval"), train.eval_batches, micro, device)
    previous_held_out = config.track_previous and first_batches(
        ray.train.get_dataset_shard("previous_eval"), train.eval_batches, micro, device
    )
    meter = Meter(config.output_dir, rank, micro * config.model.seq_len)
    first_step = {"batch_size": micro, **switches, **loaded.metrics(), "weights_streamed": built.streamed}
    # the held-out loss of the model as it came in: what the run improved on (an adapter's manifest quotes it)
    before = evaluate(engine, objective, held_out) if state.step == 0 else None

    with profiler(config, rank) as prof:
        while state.step < train.max_steps and not state.stopped_early:
            for _ in range(train.grad_accum):
                loss, stats = objective(engine, next(data))
                if ewc:
                    stats["ewc_penalty"] = ewc.penalty()
                    loss = loss + stats["ewc_penalty"]
                engine.backward(loss)
                engine.step()
                meter.add(loss, stats)
            state.step += 1
            state.micro_batches += train.grad_accum
            if train.inject_fault_at_step == state.step and rank == 0 and not state.resumed_at:
                raise RuntimeError(f"fault drill: worker 0 fails at step {state.step} (train.inject_fault_at_step)")
            extra = dict(first_step) if state.step == 1 else {}
            if state.step == 1 and before is not None:
                extra["eval_loss_before"] = before
            if state.step % train.eval_every == 0 and (eval_loss := evaluate(engine, objective, held_out)) is not None:
                state.record_eval(eval_loss, train)
                extra.update(eval_loss=eval_loss, **({"stopped_early": True} if state.stopped_early else {}))
                if previous_held_out:  # forgetting: the loss on the previous stage's held-out data
                    extra["previous_eval_loss"] = evaluate(engine, causal_lm, previous_held_out)
            last = state.step == train.max_steps or state.stopped_early
            checkpoint_now = state.step % train.checkpoint_every == 0 or last
            if state.step % train.log_every == 0 or checkpoint_now or extra:
                metrics = meter.flush(state.step, engine, extra)
                state.history.append(metrics)
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss became {metrics['loss']} at step {state.step}")
                if checkpoint_now:
                    save_checkpoint(engine, state, metrics)
                else:
                    ray.train.report(metrics)
                meter.restart_clock()
            if prof:
                prof.step()
