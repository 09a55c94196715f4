"""The distill stage: train a smaller student on the teacher's soft targets with Ray Train.

teacher (this run's merged 16-bit model, or distill.teacher_path) + student (a preset built on the
teacher's tokenizer, or distill.student_path) -> the training recipe with the distillation
objective -> runs/<name>/distill/final/model, with the student's KL to the teacher on held-out
curated text measured before and after.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ConfigError, PipelineConfig
from pipeline.loading import load_model
from pipeline.model import PRESETS, check_model_dir
from pipeline.train.data import split_texts, stage_datasets
from pipeline.train.objectives import token_kl
from pipeline.train.stage import fit, history_summary, loop_config, require_curated

log = logging.getLogger("pipeline.distill")


def teacher_dir(cfg: PipelineConfig) -> Path:
    if cfg.distill.teacher_path:
        return check_model_dir(cfg.distill.teacher_path)
    merged = cfg.stage_dir("quantize") / "merged"
    if not (merged / "config.json").is_file():
        raise FileNotFoundError(f"no teacher at {merged}: run `pipeline quantize` first or set distill.teacher_path")
    return merged


def check_same_tokenizer(teacher: Path, student: Path) -> None:
    """Soft targets are distributions over the teacher's vocabulary: the student must share it token for token."""
    t_vocab, s_vocab = AutoTokenizer.from_pretrained(teacher).get_vocab(), AutoTokenizer.from_pretrained(student).get_vocab()
    if t_vocab != s_vocab:
        differing = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ConfigError(f"distill: the student in {student} does not share the teacher's tokenizer ({teacher}): "
                          f"vocab sizes {len(s_vocab)} vs {len(t_vocab)}, {differing} token ids differ")
    t_logits, s_logits = (AutoConfig.from_pretrained(p).vocab_size for p in (teacher, student))
    if t_logits != s_logits:
        raise ConfigError(f"distill: student logits have {s_logits} entries, the teacher's {t_logits}")


def build_student(cfg: PipelineConfig, teacher: Path, out: Path) -> Path:
    d = cfg.distill
    if d.student_path:
        student = check_model_dir(d.student_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        model = AutoModelForCausalLM.from_config(PRESETS[d.student_preset](len(tokenizer)))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        student = out
        log.info("student: %s preset, %.2fM parameters, on the teacher's tokenizer", d.student_preset,
                 sum(p.numel() for p in model.parameters()) / 1e6)
    check_same_tokenizer(teacher, student)
    return student


@torch.no_grad()
def kl_to_teacher(student: Path, teacher: Path, texts: list[str], seq_len: int) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 over the texts."""
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    models = [load_model(AutoModelForCausalLM, p, dtype=torch.float32).eval() for p in (teacher, student)]
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"]
        t_logits, s_logits = (m(input_ids=ids).logits for m in models)
        total += token_kl(t_logits, s_logits).item() * ids.shape[1]
        tokens += ids.shape[1]
    return round(total / max(tokens, 1), 5)


def run_distill(cfg: PipelineConfig) -> dict:
    kept = require_curated(cfg)
    out = cfg.stage_dir("distill")
    teacher = teacher_dir(cfg)
    student = build_student(cfg, teacher, out / "student")
    d = cfg.distill
    loop = {**loop_config(cfg, student), "objective": "distill", "teacher": str(teacher), "alpha": d.alpha,
            "temperature": d.temperature, "lr": d.lr, "max_steps": d.max_steps, "lora_r": None}
    held_out = split_texts(kept, d.eval_samples, held_out=True)
    measure = ray.remote(num_cpus=1)(kl_to_teacher)
    kl_before = ray.get(measure.remote(student, teacher, held_out, cfg.model.seq_len))
    final, history = fit(cfg, loop, out, stage_datasets("pretrain", str(kept), str(student), cfg.model.seq_len))
    kl_after = ray.get(measure.remote(final / "model", teacher, held_out, cfg.model.seq_len))
    AutoTokenizer.from_pretrained(teacher).save_pretrained(final / "model")
    summary = {"teacher": str(teacher), "student": str(final / "model"), "alpha": d.alpha,
               "temperature": d.temperature, "eval_documents": len(held_out),
               "kl_to_teacher_before": kl_before, "kl_to_teacher_after": kl_after, **history_summary(history)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("distill: KL(teacher || student) on %d held-out documents %.4f -> %.4f; student in %s",
             len(held_out), kl_before, kl_after, summary["student"])
    return summary
