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
from pipeline.export.awq import quantize_awq
from pipeline.export.evaluate import perplexity, weight_bytes
from pipeline.export.merge import merge_adapter
from pipeline.model import sample_texts
from pipeline.runtime import atomic_dir

log = logging.getLogger("pipeline.quantize")
HELD_OUT = 32  # curated documents kept out of calibration to measure perplexity


def _quantize(cfg: PipelineConfig) -> dict:
    train = json.loads((cfg.stage_dir("train") / "metrics.json").read_text())
    q = cfg.quantize
    texts = list(sample_texts(cfg.stage_dir("curate") / "kept", q.calib_samples + HELD_OUT))
    calib, held_out = texts[:q.calib_samples], texts[q.calib_samples:]
    with atomic_dir(cfg.stage_dir("quantize")) as out:
        merged = merge_adapter(train["base_model"], train["adapter"], out / "merged", torch.bfloat16)
        # paths in the report are relative to the stage folder, which is renamed at the end
        report = {"merged": "merged", "merged_bytes": weight_bytes(merged),
                  "merged_perplexity": round(perplexity(merged, held_out, q.calib_seq_len), 4)}
        if q.enabled:
            awq = quantize_awq(merged, out / "awq", calib, q.group_size, q.symmetric, q.calib_seq_len)
            report.update(quantized="awq", quantized_bytes=weight_bytes(awq),
                          quantized_perplexity=round(perplexity(awq, held_out, q.calib_seq_len), 4))
            report["size_ratio"] = round(report["quantized_bytes"] / report["merged_bytes"], 4)
            report["perplexity_change"] = round(report["quantized_perplexity"] / report["merged_perplexity"] - 1, 4)
        report["serve_model"] = report.get("quantized", "merged")
        (out / "quant_report.json").write_text(json.dumps(report, indent=2))
    return report


def served_model_dir(cfg: PipelineConfig) -> Path:
    """The model the last quantize stage of this config says to serve."""
    report = cfg.stage_dir("quantize") / "quant_report.json"
    if not report.is_file():
        raise FileNotFoundError(f"no exported model in {report.parent}: run `pipeline quantize` first")
    return report.parent / json.loads(report.read_text())["serve_model"]


def run_quantize(cfg: PipelineConfig) -> dict:
    if not (cfg.stage_dir("train") / "metrics.json").is_file():
        raise FileNotFoundError(f"no trained model in {cfg.stage_dir('train')}: run `pipeline train` first")
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(_quantize)
    report = ray.get(task.remote(cfg))
    log.info("quantize: %s (%.2fx the 16-bit bytes)", report["serve_model"], report.get("size_ratio", 1.0))
    return report
