"""The quantize stage: merge the LoRA adapter, AWQ-quantize, report size and perplexity.

It runs as one Ray task, so on a cluster it lands on a GPU node when `train.use_gpu` is set.
"""

from __future__ import annotations

import json
import logging

import ray
import torch

from pipeline.config import PipelineConfig
from pipeline.errors import QualityGateError
from pipeline.export.awq import check_supported, quantize_awq
from pipeline.export.evaluate import measure
from pipeline.handoff import QUANT_REPORT, curated_dir, trained_model
from pipeline.heldout import split_texts
from pipeline.loading import load_tokenizer, write_quantized_record
from pipeline.merge import merge_adapter
from pipeline.runtime import atomic_dir
from pipeline.train.data import instruction_files, instruction_texts

log = logging.getLogger("pipeline.quantize")


def gate(report: dict, max_increase: float, force: bool) -> dict:
    """Decide whether the quantized model may be served; records the decision in the report."""
    change = report["perplexity_change"]
    passed = change <= max_increase
    report.update(
        gate={
            "max_ppl_increase": max_increase,
            "perplexity_change": change,
            "passed": passed,
            "forced": force and not passed,
        },
        serve_model="awq" if passed or force else None,
    )
    return report


def quantize_texts(cfg: PipelineConfig) -> tuple[list[str], list[str], str]:
    """(calibration texts, held-out texts for the gate, where they come from): the curated corpus, or
    without one (or with quantize.calibration=train_data) the run's own instruction and preference data."""
    settings, kept = cfg.quantize, cfg.stage_dir("curate") / "kept"
    if settings.calibration == "corpus" or (settings.calibration == "auto" and kept.is_dir()):
        kept = curated_dir(cfg)
        source = f"the curated corpus ({kept})"
        texts = [
            split_texts(kept, limit, held_out)
            for limit, held_out in ((settings.calib_samples, False), (settings.eval_samples, True))
        ]
    else:
        files = instruction_files(cfg.train.stages)
        if not files:
            raise FileNotFoundError(
                "quantize calibrates on the curated corpus or on the run's instruction data; "
                "there is neither: run `pipeline curate`, or train an sft or dpo stage"
            )
        tokenizer = load_tokenizer(trained_model(cfg).base_model, cfg.model.trust_remote_code)
        source = f"the training data ({', '.join(path for path, _ in files)})"
        texts = [
            instruction_texts(files, tokenizer, limit, held_out)
            for limit, held_out in ((settings.calib_samples, False), (settings.eval_samples, True))
        ]
    return *texts, source


def _quantize(cfg: PipelineConfig, calib: list[str], held_out: list[str], source: str, force: bool) -> dict:
    trained, settings, trust = trained_model(cfg), cfg.quantize, cfg.model.trust_remote_code
    with atomic_dir(cfg.stage_dir("quantize")) as out:
        merged = merge_adapter(trained.base_model, trained.model, out / "merged", torch.bfloat16, trust)
        # paths in the report are relative to the stage folder, which is renamed at the end
        report = {
            "merged": "merged",
            "eval_documents": len(held_out),
            "calibration": source,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "serve_model": "merged",
            **{f"merged_{k}": v for k, v in measure(merged, held_out, settings.calib_seq_len, trust).items()},
        }
        if settings.enabled:
            awq = quantize_awq(merged, out / "awq", calib, settings, trust)
            write_quantized_record(awq, merged)
            quantized = measure(awq, held_out, settings.calib_seq_len, trust)
            report.update(quantized="awq", **{f"quantized_{k}": v for k, v in quantized.items()})
            report["size_ratio"] = round(report["quantized_bytes"] / report["merged_bytes"], 4)
            report["perplexity_change"] = round(report["quantized_perplexity"] / report["merged_perplexity"] - 1, 4)
            gate(report, settings.max_ppl_increase, force)
        (out / QUANT_REPORT).write_text(json.dumps(report, indent=2))
    return report


def check_gate_documents(asked: int, found: int, source: str, force: bool) -> None:
    if found >= asked:
        return
    message = (
        f"quantize.eval_samples={asked}, but {source} has only {found} held-out documents (1 in "
        "20 by id): lower quantize.eval_samples, or give it more data"
    )
    if not force:
        raise QualityGateError(f"the quality gate would score too few documents: {message}")
    log.warning("--force: gate on fewer documents than asked: %s", message)


def check_gate_before_training(cfg: PipelineConfig, force: bool = False) -> None:
    """`pipeline run`: when the gate scores curated documents, count them right after curate, so that a
    corpus too small for the gate stops the run before hours of training, not after."""
    kept = cfg.stage_dir("curate") / "kept"
    if cfg.quantize.calibration == "train_data" or not kept.is_dir():
        return
    held_out = split_texts(kept, cfg.quantize.eval_samples, held_out=True)
    check_gate_documents(cfg.quantize.eval_samples, len(held_out), f"the curated corpus ({kept})", force)


def run_quantize(cfg: PipelineConfig, force: bool = False) -> dict:
    trained = trained_model(cfg)
    if cfg.quantize.enabled:
        check_supported(trained.base_model, cfg.quantize.symmetric, cfg.model.trust_remote_code)
    calib, held_out, source = quantize_texts(cfg)
    check_gate_documents(cfg.quantize.eval_samples, len(held_out), source, force)
    log.info("quantize: calibrating on %d and scoring %d held-out documents from %s", len(calib), len(held_out), source)
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(_quantize)
    report = ray.get(task.remote(cfg, calib, held_out, source, force))
    decision = report.get("gate")
    if decision and not decision["passed"]:
        message = (
            f"4-bit perplexity rose {decision['perplexity_change']:+.2%} "
            f"({report['merged_perplexity']:.3f} -> {report['quantized_perplexity']:.3f}), over the "
            f"{decision['max_ppl_increase']:.2%} limit (quantize.max_ppl_increase)"
        )
        if not force:
            raise QualityGateError(message + "; not deploying. --force deploys it anyway.")
        log.warning("!" * 80 + "\n--force: DEPLOYING A MODEL THAT FAILED THE QUALITY GATE: %s\n" + "!" * 80, message)
    log.info("quantize: serving %s (%.2fx the 16-bit bytes)", report["serve_model"], report.get("size_ratio", 1.0))
    return report
