"""The quantize stage: merge the LoRA adapter, AWQ-quantize, report size and perplexity.

It runs as one Ray task, so on a cluster it lands on a GPU node when `train.use_gpu` is set.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
import torch

from pipeline.config import PipelineConfig
from pipeline.errors import QualityGateError
from pipeline.export.awq import check_supported, quantize_awq
from pipeline.export.evaluate import measure
from pipeline.export.merge import merge_adapter
from pipeline.runtime import atomic_dir
from pipeline.train.data import split_texts

log = logging.getLogger("pipeline.quantize")


def gate(report: dict, max_increase: float, force: bool) -> dict:
    """Decide whether the quantized model may be served; records the decision in the report."""
    change = report["perplexity_change"]
    passed = change <= max_increase
    report.update(gate={"max_ppl_increase": max_increase, "perplexity_change": change,
                        "passed": passed, "forced": force and not passed},
                  serve_model="awq" if passed or force else None)
    return report


def _quantize(cfg: PipelineConfig, force: bool) -> dict:
    train = json.loads((cfg.stage_dir("train") / "metrics.json").read_text())
    q = cfg.quantize
    kept = cfg.stage_dir("curate") / "kept"
    calib = split_texts(kept, q.calib_samples, held_out=False)
    held_out = split_texts(kept, q.eval_samples, held_out=True)
    if not held_out:
        raise ValueError(f"the curated corpus in {kept} is too small to hold out documents for perplexity")
    with atomic_dir(cfg.stage_dir("quantize")) as out:
        merged = merge_adapter(train["base_model"], train["adapter"], out / "merged", torch.bfloat16)
        # paths in the report are relative to the stage folder, which is renamed at the end
        report = {"merged": "merged", "eval_documents": len(held_out),
                  "device": "cuda" if torch.cuda.is_available() else "cpu", "serve_model": "merged",
                  **{f"merged_{k}": v for k, v in measure(merged, held_out, q.calib_seq_len).items()}}
        if q.enabled:
            awq = quantize_awq(merged, out / "awq", calib, q.group_size, q.symmetric, q.calib_seq_len)
            report.update(quantized="awq",
                          **{f"quantized_{k}": v for k, v in measure(awq, held_out, q.calib_seq_len).items()})
            report["size_ratio"] = round(report["quantized_bytes"] / report["merged_bytes"], 4)
            report["perplexity_change"] = round(report["quantized_perplexity"] / report["merged_perplexity"] - 1, 4)
            gate(report, q.max_ppl_increase, force)
        (out / "quant_report.json").write_text(json.dumps(report, indent=2))
    return report


def served_model_dir(cfg: PipelineConfig) -> Path:
    """The model the last quantize stage of this config says to serve."""
    path = cfg.stage_dir("quantize") / "quant_report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no exported model in {path.parent}: run `pipeline quantize` first")
    report = json.loads(path.read_text())
    if report["serve_model"] is None:
        raise QualityGateError(f"the 4-bit model in {path.parent} failed the quality gate "
                               f"({report['gate']}); rerun `pipeline quantize --force` to serve it anyway")
    return path.parent / report["serve_model"]


def run_quantize(cfg: PipelineConfig, force: bool = False) -> dict:
    if not (cfg.stage_dir("train") / "metrics.json").is_file():
        raise FileNotFoundError(f"no trained model in {cfg.stage_dir('train')}: run `pipeline train` first")
    if cfg.quantize.enabled:
        base = json.loads((cfg.stage_dir("train") / "metrics.json").read_text())["base_model"]
        check_supported(base, cfg.quantize.symmetric)
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(_quantize)
    report = ray.get(task.remote(cfg, force))
    g = report.get("gate")
    if g and not g["passed"]:
        message = (f"4-bit perplexity rose {g['perplexity_change']:+.2%} "
                   f"({report['merged_perplexity']:.3f} -> {report['quantized_perplexity']:.3f}), over the "
                   f"{g['max_ppl_increase']:.2%} limit (quantize.max_ppl_increase)")
        if not force:
            raise QualityGateError(message + "; not deploying. --force deploys it anyway.")
        log.warning("!" * 80 + "\n--force: DEPLOYING A MODEL THAT FAILED THE QUALITY GATE: %s\n" + "!" * 80, message)
    log.info("quantize: serving %s (%.2fx the 16-bit bytes)", report["serve_model"], report.get("size_ratio", 1.0))
    return report
