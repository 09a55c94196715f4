"""Saving a fully fine-tuned model that is sharded over the workers (ZeRO-3 or FSDP2) without ever
gathering it whole: the parameters are gathered one decoder layer at a time (a collective: every worker
takes part), rank 0 copies them into the shard it is filling and writes each safetensors shard as it
fills. The files are what `save_pretrained` writes (the checkpoint's original weight names, e.g. one
tensor per MoE expert), so transformers and vLLM load them as they load any Hugging Face model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.shards import MAX_SHARD_BYTES, pack, write_shards
from pipeline.train.memory import whole_bytes

log = logging.getLogger("pipeline.train")
Unit = list[tuple[str, torch.nn.Parameter]]


def units(model: torch.nn.Module) -> list[Unit]:
    """The parameters in gathering units: each decoder layer, then everything else (embeddings, norm, head)."""
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight once, under its first name
    layers = model.get_decoder().layers
    per_layer = [[(names[id(p)], p) for p in layer.parameters() if id(p) in names] for layer in layers]
    in_layers = {id(p) for p in layers.parameters()}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in in_layers]
    return [unit for unit in [*per_layer, rest] if unit]


def gather(unit: Unit, keep: bool) -> dict[str, torch.Tensor]:
    """The unit's whole tensors, on the CPU of the rank that keeps them ({} elsewhere)."""
    params = [p for _, p in unit]
    if hasattr(params[0], "ds_tensor"):  # ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().to("cpu", copy=True) for n, p in unit} if keep else {}
    whole = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in unit}  # FSDP2 DTensors
    return {n: t.to("cpu", copy=True) for n, t in whole.items()} if keep else {}


def save_sharded_model(model: torch.nn.Module, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every rank calls this; rank 0 writes `directory` (weights, config, generation config, shipped code)."""
    from transformers.core_model_loading import revert_weight_conversion

    writer = dist.get_rank() == 0
    groups = pack(units(model), lambda unit: sum(whole_bytes(p) for _, p in unit), max_shard_bytes)

    def shard(group: list[Unit]) -> Callable[[], dict[str, torch.Tensor]]:
        def produce() -> dict[str, torch.Tensor]:
            tensors = {name: t for unit in group for name, t in gather(unit, writer).items()}
            return revert_weight_conversion(model, tensors) if writer else {}  # e.g. fused experts -> one each

        return produce

    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    write_shards(directory, [shard(group) for group in groups], write=writer)
    if writer:
        model.config.save_pretrained(directory)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(directory)
        if getattr(model.config, "auto_map", None):  # a model that ships its own code needs it beside the weights
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, directory, config=model.config)
        log.info("saved the model in %s, gathered a layer at a time, in %d shard(s)", directory, len(groups))
