"""What a worker's memory does: its peak so far (in every logged step) and what loading the model cost it.

Loading is where a sharded run can fail before its first step (every worker holding the whole model for
a moment), so it is measured on its own: the most the worker's memory grew while the model was built
and the parameter bytes it holds afterwards, against the whole model's."""

from __future__ import annotations

import ctypes
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

GIB = 2**30


def peak_memory(device: torch.device) -> dict:
    """The fullest worker's memory now and its peak so far (a collective: every worker calls it), the
    one that runs out first: GPU memory allocated on CUDA, else the resident set size. The peak shows
    what a run needs; the current figure shows whether it grows (a leak) or only spiked (a checkpoint)."""
    if torch.cuda.is_available():
        names = ("memory_gib", "peak_memory_gib")
        values = (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
    else:
        names = ("rss_gib", "peak_rss_gib")
        values = (resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    fullest = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(fullest, op=dist.ReduceOp.MAX)
    return {name: round(int(v) / GIB, 3) for name, v in zip(names, fullest.tolist())}


def return_freed_memory(threshold_bytes: int = 128 * 1024) -> None:
    """From now on in this process, glibc gives the memory of each freed block above `threshold_bytes` (a
    tensor's) back to the OS at once, rather than keeping it in its heap for later allocations.

    glibc raises its mmap threshold to the size of each mapped block freed, up to 32 MiB, so after the first
    few tensors are freed the next ones below that size come from the heap, which keeps what is freed and
    grows with every size it serves. A worker that loads a model a module at a time and gathers shards a
    layer at a time serves many such sizes: on 2 CPU workers sharding a 1B bf16 model (bench/memory.py), each
    worker's peak was 3.8-4.5 GiB with glibc's default against 2.0-2.3 GiB with a fixed threshold, for a
    2.1-2.4 GiB plan, at the same losses and speed. It has a price where a step allocates and frees many
    mid-sized tensors: each one above the threshold is mapped afresh and its pages faulted in, so a DDP run
    of bench/train.py (small-moe, 1 MiB activations) trained at half its speed with it (1,328 against
    2,775 tokens/s). The price is that high on the 2-CPU VM measured, which hands memory that stays free
    for two seconds back to its host: a first touch costs 7.7 s per GiB there (bench/curate.py,
    memory_first_touch_s_per_gib). Sharded runs (ZeRO-3, FSDP2) set it; runs that keep a whole replica per worker do
    not. A no-op where the C library has no `mallopt`."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt:
        mallopt(-3, threshold_bytes)  # M_MMAP_THRESHOLD in malloc.h


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; 0 for a process that has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    """This process's resident set (VmRSS), memory-mapped checkpoint pages included."""
    return status_bytes("VmRSS")


def whole_bytes(param: torch.nn.Parameter) -> int:
    """A parameter's full size, also where a worker holds only a share: ZeRO-3 keeps it as `ds_numel`, an
    FSDP2 DTensor has the global shape."""
    return (param.ds_numel if hasattr(param, "ds_numel") else param.numel()) * param.element_size()


def held_parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this worker holds, bytes of the whole model's parameters)."""
    held = whole = 0
    for p in model.parameters():
        held += held_numel(p) * p.element_size()
        whole += whole_bytes(p)
    return held, whole


def held_numel(param: torch.nn.Parameter) -> int:
    if hasattr(param, "ds_tensor"):  # a ZeRO-3 partition
        return param.ds_tensor.numel()
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()  # FSDP2: its shard


@dataclass
class LoadReport:
    """Per worker (rank order): its memory before the model was built (the process with torch and Ray, which
    does not grow with the model), the most it grew while the model was built, loaded and placed, and the
    parameter bytes it holds afterwards; the whole model's parameter bytes; and the slowest worker's seconds
    from the start of the build to the model in place."""

    growth_bytes: list[int]
    held_bytes: list[int]
    model_bytes: int
    before_bytes: list[int]
    seconds: float

    @classmethod
    def gather(
        cls, before: int, growth: int, held: int, whole: int, seconds: float, device: torch.device
    ) -> LoadReport:
        """Every worker's figures on every worker (a collective: all of them call it)."""
        mine = torch.tensor([growth, held, before, round(seconds * 1000)], dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        growths, helds, befores, millis = ([int(t[i]) for t in everyone] for i in range(4))
        return cls(growths, helds, whole, befores, max(millis) / 1000)

    def metrics(self) -> dict:
        return {
            "load_memory_growth_gib": [round(b / GIB, 6) for b in self.growth_bytes],
            "params_held_gib": [round(b / GIB, 6) for b in self.held_bytes],
            "params_whole_gib": round(self.model_bytes / GIB, 6),
            "memory_before_load_gib": [round(b / GIB, 6) for b in self.before_bytes],
            "load_seconds": self.seconds,
        }

    def describe(self) -> str:
        def each(values: list[int]) -> str:
            return "/".join(f"{b / GIB:.3f}" for b in values)

        return (
            f"model loaded: the workers hold {each(self.held_bytes)} GiB of the model's {self.model_bytes / GIB:.3f} "
            f"GiB of parameters; their memory grew by at most {each(self.growth_bytes)} GiB while loading, "
            f"which took {self.seconds:.1f} s"
        )


class LoadMeter:
    """The peak growth of memory over a `with` block: exact from CUDA's allocator on a GPU. On a CPU, the
    resident set sampled every few milliseconds by a thread: an upper bound, since the C allocator keeps
    freed memory and the pages of a memory-mapped checkpoint count in every process that reads them."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s, self.growth = device, interval_s, 0
        self._stop = threading.Event()

    def __enter__(self) -> LoadMeter:
        self.started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start, self.peak = resident_bytes(), 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        if self.device.type == "cuda":
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.growth = max(self.peak, resident_bytes()) - self.start

    def report(self, model: torch.nn.Module, device: torch.device) -> LoadReport:
        held, whole = held_parameter_bytes(model)
        return LoadReport.gather(self.start, max(self.growth, 0), held, whole, self.seconds, device)
