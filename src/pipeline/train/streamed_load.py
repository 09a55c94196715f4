"""Loading a checkpoint straight into a model sharded over the workers, one module at a time, so that no
worker ever holds the whole model: rank 0 alone reads the files, a decoder layer (FSDP2) or a module
(ZeRO-3) at a time, and every worker keeps its shard of it.

The files are read with `pread` (loading.Checkpoint). Streaming needs a checkpoint that holds every
parameter: under the model's own name, or under the names transformers converts while loading
(transformers 5 fuses the per-expert weights of an MoE checkpoint into 3-D parameters), which
`ConvertedCheckpoint` converts a parameter at a time as `from_pretrained` does. Any other checkpoint is
loaded whole by `from_pretrained` (recipe.build_model says which one ran).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pipeline.loading import Checkpoint, model_from_config

Source = Callable[[str], "torch.Tensor | None"]  # a parameter's whole value by its name in the model, on rank 0


def empty_model(architecture, trust_remote_code: bool = False, **kwargs) -> torch.nn.Module:
    """The causal LM `architecture` describes with its parameters on the meta device and its buffers real:
    what a model computes as it is built and keeps out of its checkpoint (RoPE's frequencies) is then right
    on every worker without being sent."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = model_from_config(AutoModelForCausalLM, architecture, trust_remote_code, **kwargs)
    model.tie_weights()  # the context made a new meta parameter of each one assigned, the tied head's too
    return model


@contextmanager
def no_random_init_under_zero3():
    """Models built in this block under ZeRO-3 get no random weights: their parameters keep what their
    partitions hold until `fill_partitions` writes every one of them (`streams` checked that the checkpoint
    holds them all). transformers builds a model under `deepspeed.zero.Init` without initializing it, then
    initializes it a module at a time, gathering each module's partitions on every worker and drawing its
    weights on rank 0: a pass over the whole model as long as the fill that overwrites it. The modules that
    hold no parameters are still initialized as transformers does: that is where it computes the buffers a
    checkpoint does not hold (RoPE's frequencies, which under zero.Init come out otherwise)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    draw = hf_deepspeed.initialize_weights_zero3  # an AttributeError here: transformers moved it; find where
    hf_deepspeed.initialize_weights_zero3 = initialize_parameterless_modules
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = draw


def initialize_parameterless_modules(model: torch.nn.Module) -> None:
    """transformers' `initialize_weights_zero3`, less the modules that hold parameters: each module gets its
    nearest model's `_initialize_weights`, on every worker, with nothing to gather."""
    from transformers.initialization import guard_torch_init_functions
    from transformers.modeling_utils import PreTrainedModel

    remote_code = model.is_remote_code()

    def apply(module: torch.nn.Module, initialize: Callable) -> None:
        for child in module.children():
            apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize)
        if next(module.parameters(recurse=False), None) is None:
            initialize(module, remote_code)

    with torch.no_grad(), guard_torch_init_functions():
        apply(model, model._initialize_weights)


def base_key(name: str) -> str:
    """A parameter's name in the base model's checkpoint, from its name in a peft model: the `base_model.model.`
    prefix and the wrappers' own levels (`base_layer`, `original_module`, `modules_to_save.<adapter>`) left out."""
    name = name.removeprefix("base_model.model.")
    return re.sub(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)", "", name)


class ConvertedCheckpoint:
    """A checkpoint read under the names of the model's parameters, as transformers converts the stored
    tensors while loading: a parameter made of several stored tensors (an MoE layer's experts, stored one by
    one, fused into one 3-D parameter) is read by reading them and applying transformers' own conversion,
    the one `from_pretrained` applies; the others are read as stored (renamed where transformers renames)."""

    def __init__(self, checkpoint: Checkpoint, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        self.checkpoint, self.config = checkpoint, model.config
        self.stored: dict[str, str] = {}  # a parameter's name -> its stored key
        self.parts: dict[str, tuple] = {}  # a converted parameter's name -> (converter, [(stored key, pattern)])
        for key in sorted(checkpoint.file_of, key=dot_natural_key):  # experts in their order, as transformers
            name, pattern = rename_source_key(key, renamings, converters)
            if pattern is None:
                self.stored[name] = key
            else:
                self.parts.setdefault(name, (converter_of[pattern], []))[1].append((key, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self.stored or name in self.parts

    def read(self, name: str) -> torch.Tensor:
        if name in self.stored:
            return self.checkpoint.read(self.stored[name])
        template, parts = self.parts[name]
        converter = copy.deepcopy(template)  # it collects the tensors it converts: one per parameter
        for key, pattern in parts:
            converter.add_tensor(name, key, pattern, self.checkpoint.read(key))
        return converter.convert(name, config=self.config)[name]


def streams(model: torch.nn.Module, checkpoint: Checkpoint | ConvertedCheckpoint) -> bool:
    """Whether the checkpoint holds every parameter and persistent buffer of `model` (a transformers model,
    before LoRA) under the model's own name. A tied weight counts once, under its first name."""
    every_name = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    persistent_buffers = set(model.state_dict(keep_vars=True)) - every_name
    needed = [name for name, _ in model.named_parameters()] + sorted(persistent_buffers)
    return all(name in checkpoint for name in needed)


def fill_partitions(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """ZeRO-3: every worker takes part; each module's parameters are gathered in turn, rank 0 copies the
    checkpoint's values in, and DeepSpeed partitions them again as the block ends. Buffers are not
    partitioned: each worker reads its own."""
    import deepspeed

    for prefix, module in model.named_modules():
        named = {joined(prefix, name): param for name, param in module.named_parameters(recurse=False)}
        stored = {key: param for key, param in named.items() if key in checkpoint}
        if stored:
            with deepspeed.zero.GatheredParameters(list(stored.values()), modifier_rank=0), torch.no_grad():
                if dist.get_rank() == 0:
                    for key, param in stored.items():
                        param.data.copy_(checkpoint.read(key))
        for name, buffer in module.named_buffers(recurse=False):
            if (key := joined(prefix, name)) in checkpoint:
                with torch.no_grad():
                    buffer.copy_(checkpoint.read(key))


def adapter_initial_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft model built on the meta device (its base is in the checkpoint): the LoRA weights' initial
    values, made as peft makes them (A like nn.Linear, B zero), by their names in the model."""
    from peft.tuners.lora import LoraLayer

    values = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A.keys() | module.lora_embedding_A.keys():
            for layers in (module.lora_A, module.lora_B):
                if adapter in layers:
                    layers[adapter].to_empty(device="cpu")
            for weights in (module.lora_embedding_A, module.lora_embedding_B):
                if adapter in weights:
                    weights[adapter] = torch.nn.Parameter(torch.empty_like(weights[adapter], device="cpu"))
            module.reset_lora_parameters(adapter, True)  # peft's default init: LoraSettings chooses no other
        values |= {f"{prefix}.{n}": p.detach().clone() for n, p in module.named_parameters() if not p.is_meta}
    return values


def send_shards(model: torch.nn.Module, source: Source | None) -> None:
    """FSDP2, after fully_shard and to_empty: every worker takes part; rank 0 (the one with a `source`) reads
    each decoder layer's whole tensors, then the rest's, and each worker keeps its shards of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # the units strategy.shard made, so that what is sent at once is what FSDP2 gathers at once
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, FSDPModule) and m is not model]
    sent = set()
    for prefix, unit in [*layers, ("", model)]:
        mine = {n: t for n, t in unit.state_dict(keep_vars=True).items() if joined(prefix, n) not in sent}
        sent |= {joined(prefix, n) for n in mine}
        whole = {}
        if source is not None:
            values = {n: source(joined(prefix, n)) for n in mine}
            whole = {n: v.to(mine[n].dtype) for n, v in values.items() if v is not None}
        set_model_state_dict(unit, whole, options=options)


def joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def rank0_source(model: torch.nn.Module, checkpoint: Checkpoint | None) -> Source:
    """Where rank 0 takes each whole tensor it sends: from the checkpoint, a tensor at a time (LoRA's
    initial values made here); or, with no streamable checkpoint, from the model it loaded whole."""
    if checkpoint is None:
        return model.state_dict().get
    initial = adapter_initial_values(model)

    def value(name: str) -> torch.Tensor | None:
        if name in initial:
            return initial[name]
        return checkpoint.read(base_key(name)) if base_key(name) in checkpoint else None

    return value
