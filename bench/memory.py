"""Memory per worker, measured against the plan: a ~1B-parameter dense model trained for a few steps by the
real recipe on 2 Ray Train workers, under ZeRO-2, ZeRO-3 and FSDP2, with LoRA and as a full fine-tune.

    python bench/memory.py [--out runs/bench-memory.json]     # make bench-memory; ~10 minutes on 2 cores
    python bench/memory.py --experts 8 --hidden 1024 --layers 16 --intermediate 1408 --runs zero3-lora,fsdp2-lora
                                                              # an MoE base (~0.7B), its experts stored one by one

The base is built by the script (random init, an HF folder with safetensors in bf16). Each run is
`pipeline.train.fit`, the function the train stage calls: loading (ZeRO-3 built inside deepspeed.zero.Init,
FSDP2 on the meta device, rank 0 streaming the checkpoint into the shards a module at a time), 2 optimizer
steps and the final checkpoint. A thread
reads every Ray Train worker's VmHWM (the kernel's record of its peak resident set) from /proc while it
runs; the plan is `pipeline plan`'s figure for the same config (pipeline/plan.py).

LoRA runs train in bf16 (the frozen base in 16 bits, as on GPUs); full fine-tunes in fp32, the CPU default.
A CPU without bf16 instructions multiplies bf16 matrices about 100x slower than fp32, so the sequences are
short (16 tokens): what this measures is where the weights, gradients and optimizer state live, and the
plan counts the activations of the same sequence length.
A run the plan says does not fit this machine's free memory is not started (it would take the machine
down) and is listed with the plan's figure. `"ok": true` only when
  (a) every measured worker peak is within 25% of the plan, and
  (b) under ZeRO-3 and FSDP2, every LoRA worker's peak stays below half the model's fp32 bytes: no worker
      ever held the whole model. Counted above what the worker's process held before the model was built
      (Python with torch, Ray and transformers: about 0.6 GiB that does not grow with the model; the
      recipe records it per worker). A full fine-tune cannot meet (b) on 2 workers by arithmetic: AdamW's
      state alone is 8 bytes per parameter, 4 per worker, over the 2 of half the fp32 model.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.plan import GB, make_plan  # noqa: E402
from pipeline.train.fit import fit  # noqa: E402
from pipeline.train.memory import status_bytes  # noqa: E402
from pipeline.train.recipe_config import recipe_config  # noqa: E402

GIB = 2**30
TOLERANCE = 0.25
RUNS = {  # name: overrides
    "zero2-lora": ["train.zero_stage=2"],
    "zero3-lora": ["train.zero_stage=3"],
    "fsdp2-lora": ["train.strategy=fsdp"],
    "zero2-full": ["train.zero_stage=2", "train.full_finetune=true"],
    "zero3-full": ["train.zero_stage=3", "train.full_finetune=true"],
    "fsdp2-full": ["train.strategy=fsdp", "train.full_finetune=true"],
}


def build_base(out: Path, hidden: int, layers: int, intermediate: int, vocab: int, experts: int = 0) -> int:
    """A random-init Qwen3 saved in bf16 safetensors, dense or with `experts` experts per layer (Qwen3-MoE,
    2 per token, each `intermediate` wide: transformers stores them one by one); returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    shape = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "head_dim": 128,
        "tie_word_embeddings": False,
    }
    if experts:
        config = Qwen3MoeConfig(**shape, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=intermediate)
    else:
        config = Qwen3Config(**shape, intermediate_size=intermediate)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


class WorkerPeaks:
    """Each Ray Train worker's VmHWM, read from /proc every `interval_s` while the block runs (the last
    reading of a process is its peak up to then; the kernel keeps the high-water mark for us)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peaks = interval_s, {}
        self._stop = threading.Event()

    def __enter__(self) -> WorkerPeaks:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            # the local Ray this script started runs as its children; any other Ray on the machine does not
            for proc in psutil.Process().children(recursive=True):
                try:
                    worker = (proc.cmdline() or [""])[0].startswith("ray::RayTrainWorker")
                except psutil.Error:  # it ended while being looked at
                    continue
                peak = status_bytes("VmHWM", proc.pid) if worker else 0
                if peak:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), peak)

    def per_worker(self) -> list[int]:
        return sorted(self.peaks.values(), reverse=True)


def one_run(name: str, overrides: list[str], base: Path, rows: np.ndarray, tmp: Path, room: int) -> dict:
    import ray
    from transformers import AutoConfig

    cfg = load_config("configs/tiny.yaml", overrides)
    plan = make_plan(cfg, AutoConfig.from_pretrained(base), host_memory=room * cfg.train.num_workers)
    stage = plan.stages[0]
    result = {"planned_gib": round(stage.total / GIB, 2), "plan": stage.line()}
    if not stage.fits:
        return result | {"ran": False, "why": f"the plan needs more than this machine's free {room / GIB:.1f} GiB"}
    datasets = {
        "train": ray.data.from_numpy(rows).rename_columns({"data": "input_ids"}),
        "eval": ray.data.from_numpy(rows[:4]).rename_columns({"data": "input_ids"}),
    }
    out = tmp / name
    started = time.time()
    with WorkerPeaks() as peaks:
        _, history = fit(cfg, recipe_config(cfg, base, out), out, datasets, fresh=True)
    # the workers that trained are the fullest; Ray can start a spare worker process that never loads the model
    found, before = peaks.per_worker(), history[0]["memory_before_load_gib"]
    measured, spare = found[: len(before)], found[len(before) :]
    return result | {
        "ran": True,
        "measured_gib": [round(b / GIB, 2) for b in measured],
        "spare_worker_processes_gib": [round(b / GIB, 2) for b in spare],
        "measured_over_planned": [round(b / stage.total, 3) for b in measured],
        # the most any worker grew above the smallest process it was before the model was built
        "model_gib": round(max(measured) / GIB - min(before), 2),
        "before_load_gib": [round(b, 2) for b in before],
        "params_held_gib": [round(b, 3) for b in history[0]["params_held_gib"]],
        "load_memory_growth_gib": [round(b, 2) for b in history[0]["load_memory_growth_gib"]],
        "load_seconds": history[0]["load_seconds"],
        "loss": [h["loss"] for h in history],
        "seconds": round(time.time() - started, 1),
    }


def verdict(runs: dict, fp32_bytes: int) -> dict:
    """(a) within TOLERANCE of the plan, (b) sharded LoRA workers below half the fp32 model; per run."""
    checks = {}
    for name, run in runs.items():
        if not run["ran"]:
            continue
        within = all(abs(r - 1) <= TOLERANCE for r in run["measured_over_planned"])
        sharded_lora = name.endswith("-lora") and not name.startswith("zero2")
        below_half = run["model_gib"] * GIB < fp32_bytes / 2 if sharded_lora else None
        checks[name] = {"within_25pct_of_plan": within, "below_half_fp32_model": below_half}
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument(
        "--experts", type=int, default=0, help="an MoE base with this many experts per layer, --intermediate wide"
    )
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"a comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    # the runs' checkpoints take tens of GB (a 1B full fine-tune's optimizer state): removed when done
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=os.environ.get("BENCH_TMP")) as scratch:
        result = measure(args, Path(scratch))
    emit(result, args.out)
    ray.shutdown()


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    parameters = build_base(tmp / "base", args.hidden, args.layers, args.intermediate, args.vocab, args.experts)
    rows = np.random.default_rng(0).integers(4, args.vocab, (2 * (args.steps + 4), args.seq_len))
    common = [
        f"runs_dir={tmp}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.batch_size=1",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=1",
        f"train.eval_every={100 * args.steps}",
        f"model.seq_len={args.seq_len}",
        "train.lora.modules_to_save=[]",
    ]
    # what the workers may use: the memory free now, less a margin for the driver's growth
    room = (psutil.virtual_memory().available - GB) // 2
    runs = {}
    for name in args.runs.split(","):
        precision = "train.precision=fp32" if name.endswith("-full") else "train.precision=bf16"
        runs[name] = one_run(name, common + RUNS[name] + [precision], tmp / "base", rows, tmp, room)
        print(name, json.dumps(runs[name]), file=sys.stderr, flush=True)
    checks = verdict(runs, 4 * parameters)
    return {
        "bench": "memory",
        "device": f"cpu: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB",
        "parameters": parameters,
        "experts": args.experts,
        "fp32_model_gib": round(4 * parameters / GIB, 2),
        "workers": 2,
        "seq_len": args.seq_len,
        "micro_batch": 1,
        "steps": args.steps,
        "runs": runs,
        "checks": checks,
        "ok": bool(checks) and all(v is not False for c in checks.values() for v in c.values()),
    }


if __name__ == "__main__":
    main()
