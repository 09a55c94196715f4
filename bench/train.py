"""Training throughput: our Ray Train recipe against a plain single-process PyTorch loop on the same
model, micro-batch, sequence length, optimizer and thread count, in the same run.

    python bench/train.py [--preset small-moe] [--steps 40] [--out bench/results/train-cpu2.json]
    python bench/train.py --gpu ...   # on a GPU machine: bf16, one GPU worker

Both sides: the preset built with random weights, AdamW + cosine schedule + grad clip 1.0, LoRA r16
on q/v (or --full), random token rows (throughput does not depend on the text). The plain loop is
what a user would write with transformers + peft; ours goes through Ray Train (1 worker), Ray Data
feeding, the engine (DeepSpeed ZeRO-2 or DDP) and the recipe's logging. tokens/s are measured over
steps after the first window (warm-up), and the recipe's windows leave out checkpoint writing.
Ray runs its workers at nice 15, below its own control plane; the plain loop runs at nice 0.
--worker-niceness 0 measures the same at equal priority.
Each side runs --repeats times, interleaved; the medians are compared and every run is listed.
overhead_pct = 100 * (1 - ours / plain); the target is <= 3 on CPU. recipe_overhead_pct compares ours
with the same plain loop run inside a Ray Train worker, which separates what the recipe costs from
what a Ray worker process costs on a 2-core machine shared with Ray's own processes.
MFU (GPU only) = 6 * trainable-and-frozen parameters * tokens/s / peak bf16 FLOP/s (989 TFLOP/s, H100).
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
import time
from pathlib import Path

import numpy as np
import ray.train
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.model import PRESETS  # noqa: E402
from pipeline.train.fit import fit  # noqa: E402
from pipeline.train.recipe import build_model, speed_switches  # noqa: E402
from pipeline.train.recipe_config import RecipeConfig, recipe_config  # noqa: E402

H100_BF16_FLOPS = 989e12


def build_base(preset: str, vocab: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(PRESETS[preset](vocab)).save_pretrained(out)
    return out


def plain_loop(recipe: RecipeConfig, rows: np.ndarray, steps: int, device: torch.device) -> dict:
    """The loop a user writes by hand: model, AdamW, cosine schedule, clip, no framework."""
    from transformers import get_cosine_schedule_with_warmup

    train = recipe.train
    model = build_model(recipe).model.to(device)
    switches = speed_switches(model, recipe, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, train.warmup_steps, train.max_steps)
    batch, bf16 = train.batch_size, device.type == "cuda"
    warmup, t0 = max(2, steps // 8), 0.0
    if bf16:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if step == warmup:
            torch.cuda.synchronize() if bf16 else None
            t0 = time.time()
        ids = torch.from_numpy(rows[(step * batch) % (len(rows) - batch) :][:batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if bf16 else None
    tokens = (steps - warmup) * batch * recipe.model.seq_len
    result = {"tokens_per_s": round(tokens / (time.time() - t0), 1), "final_loss": round(loss.item(), 4), **switches}
    if bf16:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def ray_loop(cfg, recipe: RecipeConfig, rows: np.ndarray, out: Path) -> dict:
    import ray

    datasets = {
        "train": ray.data.from_numpy(rows).rename_columns({"data": "input_ids"}),
        "eval": ray.data.from_numpy(rows[:16]).rename_columns({"data": "input_ids"}),
    }
    _, history = fit(cfg, recipe, out, datasets)
    windows = [h["tokens_per_s"] for h in history[2:]]  # after step 1 and the first window (warm-up)
    switches = {k: history[0][k] for k in ("attention", "compile", "cross_entropy") if k in history[0]}
    memory = {k: history[-1][k] for k in ("peak_memory_gib", "peak_rss_gib") if k in history[-1]}
    return {"tokens_per_s": round(float(np.mean(windows)), 1), "final_loss": history[-1]["loss"], **switches, **memory}


def plain_loop_in_a_ray_worker(cfg, recipe: RecipeConfig, rows: np.ndarray, steps: int) -> dict:
    """The plain loop again, inside one Ray Train worker: what running in a Ray worker process costs
    by itself (scheduling beside Ray's own processes), apart from our recipe."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def run() -> None:
        import ray.train

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train import plain_loop as loop_fn  # this file, importable in the worker

        result = loop_fn(recipe, rows, steps, torch.device("cpu"))
        with tempfile.TemporaryDirectory() as d:  # Ray Train keeps metrics only beside a checkpoint
            (Path(d) / "result.json").write_text(json.dumps(result))
            ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(d))

    result = TorchTrainer(
        run,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(storage_path=str(Path(cfg.runs_dir) / "plain")),
    ).fit()
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / "result.json").read_text())


def median_run(results: list[dict]) -> dict:
    """The median tokens/s of repeated runs, with every run's figure beside it (the spread is the noise)."""
    speeds = [r["tokens_per_s"] for r in results]
    return {"tokens_per_s": round(float(np.median(speeds)), 1), "runs": speeds, "final_loss": results[-1]["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="small-moe", help="model shape (pipeline.model.PRESETS)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on each side (CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; medians are reported")
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA r16 q/v")
    ap.add_argument("--strategies", default="deepspeed,ddp")
    ap.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="Ray workers' nice value (Ray's default is 15, below its own control plane at 0)",
    )
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # Ray workers inherit it; the plain loop below too
    torch.set_num_threads(args.threads)
    import ray

    # one CPU more than the worker takes, for Ray Data's feeding tasks
    system = {} if args.worker_niceness is None else {"worker_niceness": args.worker_niceness}
    ray.init(
        address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False, _system_config=system
    )
    device = torch.device("cuda" if args.gpu else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = build_base(args.preset, args.vocab, tmp / "base")
    rows = np.random.default_rng(0).integers(4, args.vocab, (args.batch * (args.steps + 8), args.seq_len))
    overrides = [
        f"runs_dir={tmp}",
        "train.num_workers=1",
        f"train.cpus_per_worker={args.threads}",
        f"train.use_gpu={str(args.gpu).lower()}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=5",
        f"train.eval_every={10 * args.steps}",
        "train.lr=1e-3",
        f"model.seq_len={args.seq_len}",
        f"train.full_finetune={str(args.full).lower()}",
        "train.lora.modules_to_save=[]",
    ]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # interleaved, so slow spells of the machine hit every side alike
        cfg = load_config("configs/tiny.yaml", overrides)
        recipe = recipe_config(cfg, base, tmp)
        runs.setdefault("plain", []).append(plain_loop(recipe, rows, args.steps, device))
        if not args.gpu:
            runs.setdefault("in_worker", []).append(plain_loop_in_a_ray_worker(cfg, recipe, rows, args.steps))
        for strategy in args.strategies.split(","):
            cfg = load_config(
                "configs/tiny.yaml",
                overrides
                + [f"train.strategy={strategy}"]
                + (["train.zero_stage=2"] if strategy == "deepspeed" else []),
            )
            out = tmp / f"{strategy}-{rep}"
            runs.setdefault(strategy, []).append(ray_loop(cfg, recipe_config(cfg, base, out), rows, out))
    plain, in_worker = median_run(runs["plain"]), runs.get("in_worker") and median_run(runs["in_worker"])
    ours = {}
    for strategy in args.strategies.split(","):
        ours[strategy] = median_run(runs[strategy])
        ours[strategy]["overhead_pct"] = round(100 * (1 - ours[strategy]["tokens_per_s"] / plain["tokens_per_s"]), 2)
        if in_worker:  # ours against the plain loop in the same kind of process: the recipe's own cost
            ours[strategy]["recipe_overhead_pct"] = round(
                100 * (1 - ours[strategy]["tokens_per_s"] / in_worker["tokens_per_s"]), 2
            )
    n_params = sum(p.numel() for p in build_model(recipe_config(cfg, base, tmp)).model.parameters())
    result = {
        "bench": "train",
        "device": torch.cuda.get_device_name()
        if args.gpu
        else f"cpu: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "preset": args.preset,
        "parameters": n_params,
        "lora": not args.full,
        "seq_len": args.seq_len,
        "micro_batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "ray_worker_niceness": 15 if args.worker_niceness is None else args.worker_niceness,
        "plain_pytorch": plain,
        "plain_pytorch_in_a_ray_worker": in_worker,
        "ray_train": ours,
        "target_overhead_pct": 3.0,
    }
    if args.gpu:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["mfu_plain"] = round(6 * n_params * plain["tokens_per_s"] / H100_BF16_FLOPS, 4)
    emit(result, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
