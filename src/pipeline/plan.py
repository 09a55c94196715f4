"""Memory per worker for each training stage, and per serving replica, worked out before anything starts.

The model is counted on the meta device (no weights are read or allocated), so a 66B plan takes a
second. Model states follow DeepSpeed's own accounting (`estimate_zero2/3_model_states_mem_needs`,
checked in tests/test_plan.py) generalized to a frozen base beside LoRA's trainable parameters:

  per trainable parameter, mixed precision: 16-bit weight 2, gradients 2 + 4 (16-bit and fp32; ZeRO-3
  keeps the fp32 partition only), fp32 master weight 4, AdamW moments 8. In fp32: 4 + 4 + 8 (DDP, FSDP2),
  and DeepSpeed clones the weights into an fp32 master copy all the same (+ 4).
  per frozen parameter: its weight alone, in the engine's weight dtype.

What is sharded over the N workers: ZeRO-1 the optimizer state, ZeRO-2 also the gradients, ZeRO-3 and
FSDP everything; DDP and ZeRO-0 nothing. DDP and FSDP2 keep trainable weights in fp32 and a frozen
base in 16 bits, and cast for compute (FSDP2 gathers one layer at a time in the compute dtype);
DeepSpeed casts the model to 16 bits.

Activations are counted per decoder layer from the tensors autograd keeps (the layer's inputs, q/k/v,
the attention output, the MLP's gate/up/down inputs; attention scores only for eager attention), the
fp32 logits of the loss unless train.fused_cross_entropy, and with gradient checkpointing only each
layer's input plus one layer recomputed. They grow linearly with the micro-batch, which gives the
largest micro-batch that fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import PipelineConfig, StageSpec, TrainConfig

GB = 10**9
MAX_MICRO_BATCH = 256  # what batch_size=auto ever tries
GPU_RESERVED = 2 * GB  # CUDA context, NCCL buffers and allocator fragmentation
CPU_RESERVED = 1 * GB  # a Ray Train worker's Python, torch and Ray before the model
FUSED_CHUNK_TOKENS = 2048  # train/fused_loss.py: logits exist for this many tokens at a time
VLLM_MEMORY_SHARE = 0.85  # serving/engines.py: vLLM's gpu_memory_utilization
REDUCE_BUCKET = 5 * 10**8  # DeepSpeed's reduce_bucket_size (elements): gradients are reduced through it
# ZeRO-3's stage3_max_live_parameters and stage3_max_reuse_distance, which train/strategy.py sets: DeepSpeed's
# default (1e9) keeps a 1B model gathered whole from forward to backward, more than the worker's own share
ZERO3_LIVE_PARAMETERS = 10**8


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs from a model."""

    total: int  # parameters
    trainable: int  # LoRA's adapters (and modules_to_save), or all of them for a full fine-tune
    largest_layer: int  # the largest module's own parameters: the unit ZeRO-3 gathers
    largest_block: int  # a decoder layer's parameters: the unit FSDP2 gathers
    quantizable: int  # parameters in the decoder layers' Linear weights (what AWQ makes 4-bit)
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    mlp_width: int  # MLP width a token passes through (experts per token x expert width for MoE)
    router_width: int  # MoE: experts (router logits per token); 0 for a dense model
    heads: int
    vocab: int


def count_shape(architecture, lora_peft_config=None, trust_remote_code: bool = False) -> Shape:
    """Build the model on the meta device and count; with a peft LoraConfig, count its trainable part."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.loading import model_from_config

    with torch.device("meta"):
        model = model_from_config(AutoModelForCausalLM, architecture, trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # the decoder layers: the longest ModuleList (transformers names it model.layers, remote code may not)
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    quantizable = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    trainable = total
    if lora_peft_config is not None:
        from peft import get_peft_model

        trainable = sum(p.numel() for p in get_peft_model(model, lora_peft_config).parameters() if p.requires_grad)
    a = architecture
    heads = a.num_attention_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // heads
    experts = getattr(a, "num_experts", 0) or 0
    mlp = a.num_experts_per_tok * a.moe_intermediate_size if experts else a.intermediate_size
    return Shape(
        total=total,
        trainable=trainable,
        largest_layer=largest,
        largest_block=sum(p.numel() for p in blocks[0].parameters()),
        quantizable=quantizable,
        layers=a.num_hidden_layers,
        hidden=a.hidden_size,
        q_dim=heads * head_dim,
        kv_dim=(getattr(a, "num_key_value_heads", None) or heads) * head_dim,
        mlp_width=mlp,
        router_width=experts,
        heads=heads,
        vocab=a.vocab_size,
    )


@dataclass(frozen=True)
class Memory:
    """Bytes per worker on its device (GPU, or host for CPU workers), and what ZeRO offload puts in host memory."""

    params: int
    grads: int
    optimizer: int
    buffers: int  # ZeRO-3/FSDP gathered layers, DDP's gradient buckets, a DPO reference, EWC's state
    reserved: int
    activations_per_sample: int
    logits_per_sample: int
    fixed_activations: int  # independent of the micro-batch (a chunked loss's one chunk)
    host: int  # offloaded to CPU memory

    def states(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.reserved

    def total(self, micro_batch: int) -> int:
        return (
            self.states()
            + self.fixed_activations
            + micro_batch * (self.activations_per_sample + self.logits_per_sample)
        )

    def largest_micro_batch(self, capacity: int) -> int:
        """The largest micro-batch whose total fits `capacity` (0: not even one)."""
        per_sample = self.activations_per_sample + self.logits_per_sample
        room = capacity - self.states() - self.fixed_activations
        return max(0, min(MAX_MICRO_BATCH, room // per_sample)) if per_sample else MAX_MICRO_BATCH


def model_states(shape: Shape, train: TrainConfig, workers: int) -> dict[str, int]:
    """params, grads, optimizer, buffers (gathered layers) and host bytes per worker."""
    t, f, n = shape.trainable, shape.total - shape.trainable, workers
    half = train.resolved_precision != "fp32"
    sharded = train.shards_parameters
    if train.strategy == "deepspeed":
        weight = weight_bytes(train)  # DeepSpeed casts the module to bf16/fp16
        grad = 4 + (2 if half and train.zero_stage < 3 else 0)
        stage = train.zero_stage
        optim = 8 + 4  # AdamW moments and an fp32 master copy, which DeepSpeed clones even from fp32 weights
        params = weight * (t + f) / (n if stage == 3 else 1)
        grads = grad * t / (n if stage >= 2 else 1)
        optimizer = optim * t / (n if stage >= 1 else 1)
        buffers = 4 * shape.largest_layer if stage == 3 else 0
    else:
        # trainable weights are fp32 (the master copy), a LoRA run's frozen base 16-bit (recipe.load_dtype);
        # FSDP2 gathers two layers (this one, the prefetched next) in 16 bits
        params = (4 * t + (2 if half else 4) * f) / (n if sharded else 1)
        grads = 4 * t / (n if sharded else 1)
        optimizer = 8 * t / (n if sharded else 1)
        buffers = 2 * (2 if half else 4) * shape.largest_block if sharded else 4 * t  # DDP: gradient buckets
    host = 0
    if train.offload_optimizer:  # DeepSpeed moves the optimizer, and the fp32 gradients it reads, to the CPU
        host, optimizer = optimizer + (4 * t / (n if train.zero_stage >= 2 else 1)), 0
        grads = 0 if train.zero_stage >= 2 else grads
    return {
        "params": int(params),
        "grads": int(grads),
        "optimizer": int(optimizer),
        "buffers": int(buffers),
        "host": int(host),
    }


def activations_per_sample(shape: Shape, train: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(decoder activations, loss logits) in bytes for one sequence."""
    a = 2 if train.resolved_precision != "fp32" else 4
    h = shape.hidden
    attention = 2 * h + 2 * shape.q_dim + 2 * shape.kv_dim  # norm and qkv inputs, q/k/v, attention output
    mlp = 2 * h + 3 * shape.mlp_width  # norm and gate/up inputs, gate and up outputs, down's input
    layer = seq_len * a * (attention + mlp) + seq_len * 4 * shape.router_width
    if train.attention == "eager":  # scores and probabilities, every head, seq x seq
        layer += 2 * shape.heads * seq_len * seq_len * a
    # checkpointing keeps each layer's input, and one layer's activations while it is recomputed
    decoder = shape.layers * seq_len * h * a + layer if train.gradient_checkpointing else shape.layers * layer
    logits = 0 if train.fused_cross_entropy else seq_len * shape.vocab * (a + 4 + 4)  # logits, fp32 copy, its grad
    return int(decoder), int(logits)


def weight_bytes(train: TrainConfig) -> int:
    """Bytes per element of what DeepSpeed keeps in the module's dtype (weights, gathered and bucketed)."""
    return 2 if train.resolved_precision != "fp32" else 4


def reduce_bucket(shape: Shape, train: TrainConfig) -> int:
    """ZeRO-1/2/3 reduce gradients through a buffer of REDUCE_BUCKET elements in the weights' dtype, which
    DeepSpeed's estimators leave out. A GPU allocates it whole; on a CPU only the part that gradients fill
    is ever touched, so only that part is resident."""
    if train.strategy != "deepspeed" or train.zero_stage == 0:
        return 0
    elements = REDUCE_BUCKET if train.use_gpu else min(shape.trainable, REDUCE_BUCKET)
    return elements * weight_bytes(train)


def live_parameters(shape: Shape, train: TrainConfig) -> int:
    """ZeRO-3 keeps up to ZERO3_LIVE_PARAMETERS gathered parameters (those it will reuse soon) between modules."""
    if train.strategy != "deepspeed" or train.zero_stage != 3:
        return 0
    return min(shape.total, ZERO3_LIVE_PARAMETERS) * weight_bytes(train)


def stage_memory(shape: Shape, train: TrainConfig, spec: StageSpec, seq_len: int, workers: int, first: bool) -> Memory:
    states = model_states(shape, train, workers)
    decoder, logits = activations_per_sample(shape, train, seq_len)
    extra = 0
    sequences = 1
    if spec.kind == "dpo":
        sequences = 2  # chosen and rejected side by side
        if train.full_finetune:  # the frozen reference is a second whole model (fp32, unsharded)
            extra += 4 * shape.total
    if train.ewc.enabled and not first:
        extra += 8 * shape.trainable  # Fisher diagonal and anchor weights, fp32
    extra += reduce_bucket(shape, train) + live_parameters(shape, train)
    fused_chunk = FUSED_CHUNK_TOKENS * shape.vocab * 8 if train.fused_cross_entropy else 0
    return Memory(
        params=states["params"],
        grads=states["grads"],
        optimizer=states["optimizer"],
        buffers=states["buffers"] + extra,
        reserved=GPU_RESERVED if train.use_gpu else CPU_RESERVED,
        activations_per_sample=decoder * sequences,
        logits_per_sample=logits * sequences,
        fixed_activations=fused_chunk,
        host=states["host"],
    )


@dataclass(frozen=True)
class StagePlan:
    stage: str
    kind: str
    micro_batch: int | str  # the configured one ("auto" stays auto)
    planned_micro_batch: int  # what the plan counts with: the configured one, or for auto the largest that fits
    largest_micro_batch: int
    total: int
    capacity: int
    fits: bool
    memory: Memory

    def line(self) -> str:
        where = "per GPU" if self.memory.reserved == GPU_RESERVED else "per worker (host memory)"
        verdict = "fits" if self.fits else "does NOT fit"
        host = f", {self.memory.host / GB:.1f} GB offloaded to host memory" if self.memory.host else ""
        return (
            f"{self.stage} {verdict}: {self.total / GB:.1f} of {self.capacity / GB:.1f} GB {where} at micro-batch "
            f"{self.planned_micro_batch} (largest that fits: {self.largest_micro_batch}){host}"
        )


def capacity(train: TrainConfig, host_memory: int) -> int:
    """Bytes one worker may use: its GPU, or for CPU workers its share of the host's memory."""
    if train.use_gpu:
        return int(train.gpu_memory_gb * GB)
    return host_memory // train.num_workers


def plan_stage(shape: Shape, cfg: PipelineConfig, spec: StageSpec, first: bool, room: int) -> StagePlan:
    train = cfg.train
    memory = stage_memory(shape, train, spec, cfg.model.seq_len, train.num_workers, first)
    largest = memory.largest_micro_batch(room)
    micro = max(largest, 1) if train.batch_size == "auto" else train.batch_size
    total = memory.total(micro)
    return StagePlan(
        stage=spec.name,
        kind=spec.kind,
        micro_batch=train.batch_size,
        planned_micro_batch=micro,
        largest_micro_batch=largest,
        total=total,
        capacity=room,
        fits=largest >= 1 and total <= room,
        memory=memory,
    )


@dataclass(frozen=True)
class ServePlan:
    precision: str
    weights: int
    kv_cache_per_sequence: int  # one sequence at the full context
    context: int
    max_sequences: int  # what the engine is allowed to run at once
    concurrent_sequences: int  # how many full-context sequences the memory left after the weights holds
    capacity: int
    fits: bool  # the weights and one full-context sequence

    def line(self) -> str:
        return (
            f"serving replica {'fits' if self.fits else 'does NOT fit'}: {self.precision} weights "
            f"{self.weights / GB:.1f} GB of {self.capacity / GB:.1f} GB; the rest holds the KV cache of "
            f"{self.concurrent_sequences} of the {self.max_sequences} sequences it may run at once "
            f"({self.kv_cache_per_sequence / GB:.2f} GB each at {self.context} tokens)"
        )


def plan_serving(shape: Shape, cfg: PipelineConfig, host_memory: int) -> ServePlan:
    """Weights at the served precision, and KV cache for as many full-context sequences as the rest holds
    (vLLM allocates its cache from what the weights leave and runs fewer sequences when it is short)."""
    serve, quant = cfg.serve, cfg.quantize
    if quant.enabled:  # 4-bit decoder Linear weights with a 16-bit scale and zero point per group
        weights = shape.quantizable * (0.5 + 4 / quant.group_size) + 2 * (shape.total - shape.quantizable)
        precision = f"AWQ 4-bit (group {quant.group_size})"
    else:
        weights, precision = 2 * shape.total, "16-bit"
    context = serve.max_prompt_tokens + serve.max_new_tokens
    gpu = serve.num_gpus > 0
    # vLLM runs up to max_queue sequences at once (serving/engines.py); transformers batches max_batch_size
    most = serve.max_queue if gpu else serve.max_batch_size
    per_sequence = 2 * shape.layers * shape.kv_dim * 2 * context  # K and V, 16-bit, every layer
    room = int(serve.num_gpus * cfg.train.gpu_memory_gb * GB * VLLM_MEMORY_SHARE) if gpu else host_memory
    concurrent = int(min(most, max(0, room - weights) // per_sequence))
    return ServePlan(precision, int(weights), per_sequence, context, most, concurrent, room, concurrent >= 1)


@dataclass(frozen=True)
class Plan:
    config: str
    parameters: int
    trainable: int
    strategy: str
    workers: int
    stages: list[StagePlan]
    serving: ServePlan

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def verdict(self) -> str:
        """The one line `pipeline train` prints before it starts workers."""
        head = f"memory plan ({self.strategy}, {self.workers} worker{'s' if self.workers > 1 else ''}): "
        return head + "; ".join(s.line() for s in self.stages)

    def to_json(self) -> dict:
        def stage(s: StagePlan) -> dict:
            return {
                **{k: v for k, v in dataclasses.asdict(s).items() if k != "memory"},
                "gb": {
                    k: round(v / GB, 3)
                    for k, v in dataclasses.asdict(s.memory).items()
                    if k not in ("activations_per_sample", "logits_per_sample")
                }
                | {
                    "activations": round(s.memory.activations_per_sample * s.planned_micro_batch / GB, 3),
                    "logits": round(s.memory.logits_per_sample * s.planned_micro_batch / GB, 3),
                    "total": round(s.total / GB, 3),
                    "capacity": round(s.capacity / GB, 3),
                },
            }

        return {
            "config": self.config,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "strategy": self.strategy,
            "workers": self.workers,
            "fits": self.fits,
            "stages": [stage(s) for s in self.stages],
            "serving": dataclasses.asdict(self.serving),
        }


def strategy_name(train: TrainConfig) -> str:
    return f"ZeRO-{train.zero_stage}" if train.strategy == "deepspeed" else train.strategy.upper()


def make_plan(cfg: PipelineConfig, architecture, host_memory: int | None = None) -> Plan:
    """`host_memory`: what CPU workers and replicas share; default this machine's."""
    if host_memory is None:
        import psutil

        host_memory = psutil.virtual_memory().total
    train = cfg.train
    lora = None if train.full_finetune else train.lora.peft_config()
    shape = count_shape(architecture, lora, cfg.model.trust_remote_code)
    room = capacity(train, host_memory)
    stages = [plan_stage(shape, cfg, spec, i == 0, room) for i, spec in enumerate(train.stages)]
    name = strategy_name(train) + (" + optimizer offload" if train.offload_optimizer else "")
    return Plan(
        cfg.name, shape.total, shape.trainable, name, train.num_workers, stages, plan_serving(shape, cfg, host_memory)
    )


def report(plan: Plan) -> str:
    """`pipeline plan`'s text: per stage what each part takes, then the verdicts."""
    parts = ["params", "grads", "optimizer", "buffers", "reserved", "activations", "logits", "total", "capacity"]
    out = [f"{plan.config}: {plan.parameters / 1e9:.2f}B parameters, {plan.trainable / 1e6:.1f}M trainable"]
    for s in plan.to_json()["stages"]:
        gb = s["gb"]
        out.append(f"  {s['stage']} (micro-batch {s['planned_micro_batch']}), GB per worker:")
        out.append("    " + "  ".join(f"{p} {gb[p]:.2f}" for p in parts))
    out += [plan.verdict(), plan.serving.line()]
    return "\n".join(out)
