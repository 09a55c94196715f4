"""How the model is spread over the workers: DeepSpeed ZeRO 0-3, PyTorch FSDP2 or DDP.

Both engines give the recipe the same few calls, so the training loop does not know which runs:
`engine(**batch)` (forward), `backward(loss)`, `step()` (an optimizer step at the end of each
accumulation window), `lr`, `grad_norm`, `module` (the model itself), `train(mode)`, `save(dir)` /
`load(dir)` (the whole training state, each rank its own shard) and `save_model(dir)` (the
adapter or the whole model in Hugging Face format, written by rank 0).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from pipeline.config import TrainConfig
from pipeline.plan import ZERO3_LIVE_PARAMETERS
from pipeline.train.sharded_save import save_sharded_model
from pipeline.train.streamed_load import Source, send_shards

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(train: TrainConfig) -> torch.dtype | None:
    """The dtype of mixed-precision compute, None for plain fp32."""
    return DTYPES[train.resolved_precision]


def deepspeed_config(train: TrainConfig, micro_batch: int) -> dict:
    """Generated from our config; a user's DeepSpeed JSON (train.deepspeed_config) overrides any key."""
    zero = {"stage": train.zero_stage}
    if train.zero_stage == 3:  # bound what stays gathered (pipeline/plan.py counts it)
        zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = ZERO3_LIVE_PARAMETERS
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # torch_adam: the fused DeepSpeed Adam would JIT-compile a C++ op on CPU first
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": 0.0, "torch_adam": True}},
        "bf16": {"enabled": train.resolved_precision == "bf16"},
        "fp16": {"enabled": train.resolved_precision == "fp16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        generated = _deep_merge(generated, json.loads(Path(train.deepspeed_config).read_text()))
    generated.pop("train_batch_size", None)  # DeepSpeed derives it from micro-batch x accumulation x world
    return generated


@contextmanager
def partitioned_loading(train: TrainConfig):
    """Under ZeRO-3, models built in this block are partitioned as they are created: transformers builds
    them inside `deepspeed.zero.Init` and loads the checkpoint module by module into the partitions, so no
    worker ever holds the whole model. ZeRO-1/2 and DDP keep a whole replica per worker by design.
    transformers reads the setting from a process-wide reference, so it holds only inside the block."""
    if train.strategy != "deepspeed" or train.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # zero.Init reads the ZeRO section and the dtype; the micro-batch is not known yet and does not matter.
    # transformers keeps only a weak reference: `settings` holds it for the block
    settings = HfDeepSpeedConfig(deepspeed_config(train, micro_batch=1))
    try:
        yield settings
    finally:
        unset_hf_deepspeed_config()


def _deep_merge(base: dict, over: dict) -> dict:
    return {
        **base,
        **{
            k: _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in over.items()
        },
    }


def is_adapter(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def mark_moe_leaves(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers parameters module by module as hooks fire; an MoE block only runs the experts
    its tokens picked, so ranks disagree on which hooks fire and hang. Leaf modules are gathered whole."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = {type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}
    if blocks:
        set_z3_leaf_modules(model, list(blocks))


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, train: TrainConfig, micro_batch: int):
        import deepspeed

        if train.zero_stage == 3:
            mark_moe_leaves(model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(train, micro_batch),
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, train.warmup_steps, train.max_steps),
        )
        self.module = self.engine.module

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/accumulation itself

    def step(self) -> None:
        self.engine.step()  # steps the optimizer only at accumulation boundaries

    def train(self, mode: bool) -> None:
        self.engine.train(mode)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def grad_norm(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="ds", exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="ds", load_module_strict=False)

    def save_model(self, directory: Path) -> None:
        """Under ZeRO-3 each rank holds a shard of every parameter: a whole model is gathered and written a
        layer at a time; an adapter, small, is gathered whole so that rank 0 saves whole tensors."""
        if self.engine.zero_optimization_stage() == 3 and not is_adapter(self.module):
            save_sharded_model(self.module, directory)
            return
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(trainable):
                if dist.get_rank() == 0:
                    self.module.save_pretrained(directory)
        elif dist.get_rank() == 0:
            self.module.save_pretrained(directory)


class TorchEngine:
    """DDP or FSDP2 with AdamW, a cosine schedule, accumulation, clipping and mixed precision."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        self.accum, self.clip, self.micro_steps, self.grad_norm = train.grad_accum, train.grad_clip, 0, 0.0
        dtype = autocast_dtype(train)
        self.module = model  # `place` put it on the device (FSDP2: sharded it)
        self.sharded = train.strategy == "fsdp"
        if self.sharded:
            self.model, self.autocast = model, None  # FSDP2 casts parameters itself
        else:
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.autocast = dtype and torch.autocast(device.type, dtype=dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=0.0)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, train.warmup_steps, train.max_steps)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def __call__(self, **batch):
        if self.autocast is None:
            return self.model(**batch)
        with self.autocast:
            return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool) -> None:
        self.module.train(mode)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(Path(directory) / "dcp"))  # each rank writes its shard
        if dist.get_rank() == 0:
            torch.save(
                {
                    "scheduler": self.scheduler.state_dict(),
                    "micro_steps": self.micro_steps,
                    "scaler": self.scaler and self.scaler.state_dict(),
                },
                Path(directory) / "engine.pt",
            )

    def load(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(Path(directory) / "dcp"))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=False),
        )
        extra = torch.load(Path(directory) / "engine.pt", weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.micro_steps = extra["micro_steps"]
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def save_model(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.sharded and not is_adapter(self.module):
            save_sharded_model(self.module, directory)  # a whole model, gathered a layer at a time
            return
        # collective under FSDP: every rank takes part, rank 0 receives whole tensors (trainable ones only)
        whole = get_model_state_dict(
            self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        )
        if dist.get_rank() == 0:
            self.module.save_pretrained(directory, state_dict=whole)


def shard(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """FSDP2: each decoder layer is one unit (gathered for its forward, freed after), then the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def place(model: torch.nn.Module, source: Source | None, train: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Puts a built model where training keeps it. FSDP2 shards it over the workers, which built it on the
    meta device (but rank 0, when it loaded it whole); rank 0 reads each decoder layer's whole tensors
    from `source` and sends every worker its shards (streamed_load.send_shards)."""
    if train.strategy != "fsdp":
        return model.to(device)
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}  # computed when built
    shard(model, autocast_dtype(train))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    send_shards(model, source)
    return model


def build_engine(model: torch.nn.Module, train: TrainConfig, micro_batch: int, device: torch.device):
    """The micro-batch is given apart from `train`: with batch_size=auto it is only known on the workers."""
    if train.strategy == "deepspeed":
        return DeepSpeedEngine(model, train, micro_batch)
    return TorchEngine(model, train, device)
