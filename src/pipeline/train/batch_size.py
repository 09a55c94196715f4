"""train.batch_size=auto: a memory rule as a first guess, then halved until a step fits."""

from __future__ import annotations

import logging
from collections.abc import Callable

import psutil
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.train.strategy import autocast_dtype

log = logging.getLogger("pipeline.train")

MAX_GUESS = 256
CPU_MAX = 8  # on CPUs time, not memory, is the limit: bigger micro-batches only make steps slower


def memory_rule(mem_bytes: int, seq_len: int, d_model: int) -> int:
    """floor(memory / (seq_len * d_model * 4 bytes)): memory over the bytes of one sample's fp32 hidden
    states. It ignores depth and optimizer state, so it overshoots; halving corrects it."""
    return max(1, min(MAX_GUESS, mem_bytes // (seq_len * d_model * 4)))


def halve_until_fits(try_step: Callable[[int], None], start: int) -> int:
    """The largest of start, start/2, ... for which `try_step(batch)` does not run out of CUDA memory."""
    batch = start
    while True:
        try:
            try_step(batch)
            return batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise RuntimeError(
                    "a micro-batch of 1 runs out of GPU memory: turn on train.gradient_checkpointing, "
                    "use zero_stage 3 or strategy fsdp, or train.offload_optimizer"
                ) from None
            log.warning("micro-batch %d ran out of GPU memory; trying %d", batch, batch // 2)
            batch //= 2
            torch.cuda.empty_cache()


def probe(model: torch.nn.Module, seq_len: int, device: torch.device, dtype) -> Callable[[int], None]:
    """One forward and backward of random tokens at a given micro-batch."""

    def try_step(batch: int) -> None:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    return try_step


def choose_batch_size(
    model: torch.nn.Module, train: TrainConfig, seq_len: int, device: torch.device, planned: int | None
) -> int:
    """`planned`: the memory plan's largest micro-batch that fits (pipeline/plan.py), for sharded runs."""
    if train.batch_size != "auto":
        return train.batch_size
    hidden = model.config.hidden_size
    if device.type == "cuda":
        # a sharded model may not fit whole on one GPU, so it cannot be probed before sharding: the plan decides
        if train.shards_parameters:
            chosen = planned or 1
        else:
            guess = memory_rule(torch.cuda.get_device_properties(device).total_memory, seq_len, hidden)
            chosen = halve_until_fits(probe(model.to(device), seq_len, device, autocast_dtype(train)), guess)
    else:
        chosen = min(CPU_MAX, memory_rule(psutil.virtual_memory().available, seq_len, hidden))
    agreed = torch.tensor(chosen, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every worker steps with the same micro-batch
    log.info(
        "batch_size=auto: micro-batch %d per worker (the memory plan, or the memory rule then halving on OOM)",
        int(agreed),
    )
    return int(agreed)
