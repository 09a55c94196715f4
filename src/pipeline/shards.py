"""Writing a model's weights as safetensors shards in the Hugging Face layout (`model.safetensors`, or
`model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`) one shard at a time, so that
the writer's memory is one shard, never the model. The merge streams tensors from the base's files
through it; training streams a sharded model's parameters gathered a layer at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_SHARD_BYTES = 2 * 10**9


def pack(items: list, size: Callable, limit: int) -> list[list]:
    """Consecutive items in groups of at most `limit` bytes (an item larger than that is a group alone)."""
    groups, current, filled = [], [], 0
    for item in items:
        if current and filled + size(item) > limit:
            groups.append(current)
            current, filled = [], 0
        current.append(item)
        filled += size(item)
    return [*groups, current] if current else groups


def write_shards(out: Path, shards: list[Callable[[], dict[str, torch.Tensor]]], write: bool = True) -> None:
    """Calls each shard's producer in order and writes what it returns as the next file; the index too
    when there is more than one. `write=False` runs the producers only (in a distributed save, the ranks
    that take part in gathering but do not write)."""
    weight_map, written = {}, 0
    for i, produce in enumerate(shards, 1):
        tensors = produce()
        if not write:
            continue
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: t.contiguous() for k, t in tensors.items()}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        written += sum(t.numel() * t.element_size() for t in tensors.values())
    if write and len(shards) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
