"""One prepared check for one GPU, written as one JSON (bench/gpu_check.sh runs it there):

1. training throughput, LoRA r16 on q/v, bf16, seq 2048, micro-batch 8, for a Qwen2-0.5B shape and a
   small Qwen3-MoE shape (0.96B parameters, 0.43B active, 32 experts, top-4): the plain transformers +
   peft loop a user writes by hand against our Ray Train recipe (DeepSpeed ZeRO-2 and FSDP2), each with
   and without the speed switches (train.fused_cross_entropy, train.compile): tokens/s, peak GPU memory
   and MFU (6 x parameters, active ones for the MoE, x tokens/s over the 989 TFLOP/s bf16 datasheet peak);
2. the transformers serving engine's QPS at concurrency 8, batching on and off;
3. AWQ 4-bit (made here by the pipeline's own quantize_awq, carried in .gpu-check/) against the same
   architecture in 16-bit: greedy decoding tokens/s at batch 1.

Sections run in order of importance under one deadline; what did not fit is listed as skipped, and a
failing section records its error and the rest go on. The JSON is rewritten after each section, so a
run cut short still returns what it measured.

    python bench/gpu_check.py --prepare .gpu-check     # here, on CPU: tokenizer + AWQ model to carry
    python bench/gpu_check.py --out gpu_check.json     # on the GPU machine
    python bench/gpu_check.py --dry-run --out x.json   # CPU, tiny shapes, a couple of minutes (tests run it)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(Path(__file__).resolve().parent)]

from train import plain_loop, ray_loop  # noqa: E402  (bench/train.py)

from pipeline.config import load_config  # noqa: E402
from pipeline.train.recipe_config import recipe_config  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16, datasheet; a plain matmul measured 770-800 TFLOP/s there
SWITCHES = ["train.fused_cross_entropy=true", "train.compile=true"]
# (shape, run, needs) in order of importance; `needs` is the seconds it must have left to start
PLAN = [
    ("dense", "plain", 30),
    ("dense", "zero2", 60),
    ("dense", "fsdp2", 60),
    ("dense", "plain+switches", 90),
    ("dense", "zero2+switches", 120),
    ("serving", "", 60),
    ("awq", "", 40),
    ("moe", "plain", 40),
    ("moe", "zero2", 60),
    ("moe", "plain+fused_ce", 40),
    ("moe", "zero2+fused_ce", 60),
    ("moe", "fsdp2", 60),
    ("moe", "fsdp2+fused_ce", 60),
    ("dense", "fsdp2+switches", 120),
]
# the dry run takes one run of each code path: the plain loop, Ray Train, the switches, both shapes, serving, AWQ
DRY_PLAN = {
    ("dense", "plain"),
    ("dense", "plain+switches"),
    ("moe", "fsdp2+fused_ce"),  # one Ray Train run: the strategies differ only in the config it is given
    ("serving", ""),
    ("awq", ""),
}
RUNS = {"plain": [], "zero2": ["train.strategy=deepspeed", "train.zero_stage=2"], "fsdp2": ["train.strategy=fsdp"]}


def shapes(dry_run: bool) -> dict:
    from transformers import Qwen2Config, Qwen3MoeConfig

    from pipeline.model import PRESETS

    if dry_run:
        return {"dense": PRESETS["tiny-dense"](1024), "moe": PRESETS["tiny-moe"](1024)}
    return {
        "dense": Qwen2Config(  # Qwen2-0.5B
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
        "moe": Qwen3MoeConfig(
            vocab_size=151936,
            hidden_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            moe_intermediate_size=384,
            num_experts=32,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            intermediate_size=2816,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        ),
    }


def parameter_counts(model) -> tuple[int, int]:
    """All parameters, and those one token passes through (MoE: top-k of the experts)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if not experts:
        return total, total
    return total, int(total - experts * (1 - config.num_experts_per_tok / config.num_experts))


def build_base(architecture, out: Path) -> tuple[Path, int, int]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(architecture)
    counts = parameter_counts(model)
    model.to(torch.bfloat16).save_pretrained(out)
    return out, *counts


class Report:
    """The JSON being built, rewritten to disk after every section, under one deadline."""

    def __init__(self, out: Path, budget_s: float, **facts):
        self.out, self.deadline, self.start = out, time.time() + budget_s, time.time()
        self.data = {**facts, "train": {}, "skipped": [], "errors": {}}

    def run(self, name: str, needs_s: float, fn) -> None:
        if time.time() + needs_s > self.deadline:
            self.data["skipped"].append(f"{name} (needed {needs_s:.0f} s, {self.deadline - time.time():.0f} s left)")
        else:
            t0 = time.time()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' figures
                self.data["errors"][name] = traceback.format_exc(limit=-3)[-2000:]
                print(f"gpu_check: {name} failed: {e!r}", file=sys.stderr)
            print(f"gpu_check: {name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        self.data["seconds"] = round(time.time() - self.start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=2) + "\n")


def train_settings(args, tmp: Path, gpu: bool) -> list[str]:
    return [
        f"runs_dir={tmp}",
        "train.num_workers=1",
        f"train.use_gpu={str(gpu).lower()}",
        f"train.cpus_per_worker={args.cpus}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.eval_every={100 * args.steps}",
        "train.lr=1e-4",
        "train.warmup_steps=2",
        f"model.seq_len={args.seq_len}",
        "train.lora.modules_to_save=[]",
        "train.lora.target_modules=[q_proj, v_proj]",
        "train.lora.r=16",
        "train.lora.dropout=0",
    ]


def train_run(report: Report, shape: str, run: str, bases: dict, rows: np.ndarray, args, tmp: Path) -> None:
    base, total, active = bases[shape]
    strategy, _, switch = run.partition("+")
    switches = {"": [], "switches": args.switches, "fused_ce": SWITCHES[:1]}[switch]
    gpu = torch.cuda.is_available()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", train_settings(args, tmp, gpu) + RUNS[strategy] + switches)
    out = tmp / f"{shape}-{run}"
    recipe = recipe_config(cfg, base, out)
    t0 = time.time()
    if strategy == "plain":
        result = plain_loop(recipe, rows, args.steps, torch.device("cuda" if gpu else "cpu"))
        torch.cuda.empty_cache() if gpu else None  # Ray Train's workers are other processes: give the memory back
    else:
        result = ray_loop(cfg, recipe, rows, out)
    result["seconds"] = round(time.time() - t0, 1)
    result["mfu"] = round(6 * active * result["tokens_per_s"] / PEAK_BF16_FLOPS, 4)
    entry = report.data["train"].setdefault(shape, {"parameters": total, "active_parameters": active, "runs": {}})
    entry["runs"][run] = result


def serving(report: Report, model_dir: Path, tokenizer_dir: Path, args) -> None:
    """The transformers engine at concurrency 8 for a fixed time, batching off (1) and on (8)."""
    from pipeline.serving.transformers_engine import TransformersEngine
    from pipeline.serving.types import Sampling

    served = tokenizer_dir.parent / "served"
    shutil.copytree(tokenizer_dir, served, dirs_exist_ok=True)
    for f in model_dir.iterdir():  # the model's files beside the carried tokenizer
        (served / f.name).symlink_to(f.resolve())
    words = (ROOT / "data" / "instructions.jsonl").read_text().split()
    prompts = [" ".join(words[i * 40 : (i + 1) * 40]) for i in range(64)]
    sampling = Sampling(max_new_tokens=args.new_tokens)
    results = {}
    for name, batch in (("batching_off", 1), ("batching_on", 8)):
        sizes: list[int] = []
        engine = TransformersEngine(
            str(served), False, max_batch_size=batch, batch_wait_timeout_s=0.01, on_batch=sizes.append
        )
        done, tokens = asyncio.run(load(engine, prompts, sampling, args.serve_seconds))
        results[name] = {
            "qps": round(done / args.serve_seconds, 2),
            "tokens_per_s": round(tokens / args.serve_seconds, 1),
            "requests": done,
            "mean_batch": round(float(np.mean(sizes)), 2) if sizes else None,
        }
        del engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    results["speedup_qps"] = round(results["batching_on"]["qps"] / max(results["batching_off"]["qps"], 1e-9), 2)
    report.data["serving"] = {
        "model": "the dense shape, random weights",
        "concurrency": 8,
        "new_tokens": args.new_tokens,
        "seconds_each": args.serve_seconds,
        **results,
    }


async def load(engine, prompts: list[str], sampling, seconds: float) -> tuple[int, int]:
    """8 clients, each sending its next request when the last one answered, until the time is up."""
    stop, done, tokens = time.time() + seconds, [0], [0]

    async def client(i: int) -> None:
        while time.time() < stop:
            completion = await engine.complete(prompts[(i + done[0]) % len(prompts)], sampling)
            done[0] += 1
            tokens[0] += completion.completion_tokens

    await asyncio.gather(*(client(i) for i in range(8)))
    return done[0], tokens[0]


def awq_speed(report: Report, carried: Path, tmp: Path) -> None:
    """Greedy tokens/s at batch 1 of the AWQ model and of the same architecture in 16-bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.export.evaluate import generation_tokens_per_s
    from pipeline.loading import load_model, load_tokenizer

    config = AutoConfig.from_pretrained(carried / "awq")
    delattr(config, "quantization_config")
    sixteen = tmp / "awq-16bit"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(sixteen)
    tokenizer = load_tokenizer(carried / "awq")
    prompts = ["Permission is hereby granted, free of charge, to any person obtaining a copy"] * 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speeds = {}
    for name, path in (("awq_w4a16", carried / "awq"), ("bf16", sixteen)):
        model = load_model(AutoModelForCausalLM, path).to(device).eval()
        speeds[name] = generation_tokens_per_s(model, tokenizer, prompts, new_tokens=64)
        del model
    report.data["awq"] = {
        "model": json.loads((carried / "shape.json").read_text()),
        "batch": 1,
        "new_tokens": 64,
        "tokens_per_s": speeds,
        "awq_over_bf16": round(speeds["awq_w4a16"] / speeds["bf16"], 3),
        "bytes": {
            name: sum(f.stat().st_size for f in p.glob("*.safetensors"))
            for name, p in (("awq_w4a16", carried / "awq"), ("bf16", sixteen))
        },
    }


def prepare(out: Path, dry_run: bool) -> Path:
    """Here, on CPU: a BPE tokenizer on the licence texts and a Qwen2-shaped model AWQ-quantized by the
    pipeline's own quantize_awq, small enough to carry to the GPU machine (llm-compressor is not there)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from pipeline.config import QuantizeConfig
    from pipeline.export.awq import quantize_awq
    from pipeline.model import train_tokenizer
    from pipeline.sample_data import source_files, split_documents

    texts = [d for p in source_files()[:200] for d in split_documents(p.read_text(errors="replace"))]
    shape = {
        "hidden_size": 128 if dry_run else 512,
        "num_hidden_layers": 2 if dry_run else 6,
        "intermediate_size": 256 if dry_run else 1536,
        "num_attention_heads": 4 if dry_run else 8,
        "num_key_value_heads": 2,
        "vocab_size": 1024 if dry_run else 4096,
    }
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = train_tokenizer(texts, shape["vocab_size"])
    tokenizer.save_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    )
    model.to(torch.bfloat16).save_pretrained(out / "bf16")
    tokenizer.save_pretrained(out / "bf16")
    settings = QuantizeConfig(group_size=128, symmetric=True, calib_seq_len=128)
    quantize_awq(out / "bf16", out / "awq", texts[:32], settings, trust_remote_code=False)
    shutil.rmtree(out / "bf16")
    (out / "shape.json").write_text(json.dumps(shape))
    return out


def facts(dry_run: bool, args) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "ray", "deepspeed", "liger-kernel", "compressed-tensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.is_available()
    return {
        "bench": "gpu_check",
        "dry_run": dry_run,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if gpu else f"cpu: {os.cpu_count()} cores ({platform.machine()})",
        "versions": versions,
        "seq_len": args.seq_len,
        "micro_batch": args.batch,
        "steps": args.steps,
        "lora": "r16 on q_proj, v_proj; base frozen",
        "precision": "bf16" if gpu else "fp32",
        "mfu": "6 x (active) parameters x tokens/s / 989e12 (bf16 dense peak, datasheet)",
        "tokens_per_s": "mean of the logging windows after the first two (compilation and warm-up excluded)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, short runs (the test suite's check)")
    ap.add_argument("--prepare", type=Path, help="only build the carried tokenizer + AWQ model into this folder")
    ap.add_argument("--carried", type=Path, default=ROOT / ".gpu-check", help="what --prepare built")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=450, help="no section starts that would end after this")
    ap.add_argument("--no-compile", action="store_true", help="leave train.compile out of the switches")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.prepare:
        print(prepare(args.prepare, args.dry_run))
        return
    dry = args.dry_run
    args.seq_len, args.batch, args.steps, args.log_every = (64, 4, 6, 2) if dry else (2048, 8, 16, 4)
    args.cpus, args.new_tokens, args.serve_seconds = (1, 8, 3) if dry else (8, 64, 12)
    args.switches = SWITCHES[:1] if args.no_compile else SWITCHES
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report = Report(args.out, args.budget_s, **facts(dry, args))
    if dry:  # its own tiny tokenizer and AWQ model: the carried ones fit the GPU shapes
        args.carried = prepare(tmp / "carried", dry_run=True)

    import ray

    gpu = torch.cuda.is_available()
    ray.init(  # "local": its own Ray, never one that `ray start` or another run left on the machine
        address="local",
        num_cpus=os.cpu_count() if gpu else 2,
        num_gpus=1 if gpu else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    bases, architectures = {}, shapes(dry)
    for name, architecture in architectures.items():
        bases[name] = build_base(architecture, tmp / f"base-{name}")
    rows = np.random.default_rng(0).integers(4, 1000, (args.batch * (args.steps + 8), args.seq_len))
    shutil.copytree(args.carried / "tokenizer", tmp / "serving")
    for shape, run, needs in PLAN:
        if dry and (shape, run) not in DRY_PLAN:
            continue
        if shape == "serving":
            report.run("serving", needs, lambda: serving(report, bases["dense"][0], tmp / "serving", args))
        elif shape == "awq":
            report.run("awq", needs, lambda: awq_speed(report, args.carried, tmp))
        else:
            report.run(
                f"train {shape} {run}", needs, lambda s=shape, r=run: train_run(report, s, r, bases, rows, args, tmp)
            )
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report.data, indent=2))


if __name__ == "__main__":
    main()
