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
from transformers import AutoModelForCausalLM

from pipeline.config import ConfigError, PipelineConfig
from pipeline.digest import path_digest
from pipeline.handoff import curated_dir, merged_model_dir
from pipeline.heldout import split_texts
from pipeline.loading import load_model, load_model_config, load_tokenizer, model_from_config
from pipeline.model import PRESETS, check_model_dir
from pipeline.train.data import stage_datasets
from pipeline.train.fit import fit, history_summary
from pipeline.train.objectives import token_kl
from pipeline.train.recipe_config import recipe_config

log = logging.getLogger("pipeline.distill")


def teacher_dir(cfg: PipelineConfig) -> Path:
    if cfg.distill.teacher_path:
        return check_model_dir(cfg.distill.teacher_path, cfg.model.trust_remote_code)
    try:
        return merged_model_dir(cfg)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}, or set distill.teacher_path") from None


def check_same_tokenizer(teacher: Path, student: Path, trust_remote_code: bool) -> None:
    """Soft targets are distributions over the teacher's vocabulary: the student must share it token for token."""
    teacher_vocab, student_vocab = (load_tokenizer(p, trust_remote_code).get_vocab() for p in (teacher, student))
    if teacher_vocab != student_vocab:
        differing = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
        raise ConfigError(
            f"distill: the student in {student} does not share the teacher's tokenizer ({teacher}): "
            f"vocab sizes {len(student_vocab)} vs {len(teacher_vocab)}, {differing} token ids differ"
        )
    teacher_logits, student_logits = (load_model_config(p, trust_remote_code).vocab_size for p in (teacher, student))
    if teacher_logits != student_logits:
        raise ConfigError(f"distill: student logits have {student_logits} entries, the teacher's {teacher_logits}")


def build_student(cfg: PipelineConfig, teacher: Path, out: Path) -> Path:
    settings, trust = cfg.distill, cfg.model.trust_remote_code
    if settings.student_path:
        student = check_model_dir(settings.student_path, trust)
    else:
        tokenizer = load_tokenizer(teacher, trust)
        torch.manual_seed(0)  # the same student every run, so a rerun can resume it
        model = model_from_config(AutoModelForCausalLM, PRESETS[settings.student_preset](len(tokenizer)))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        student = out
        log.info(
            "student: %s preset, %.2fM parameters, on the teacher's tokenizer",
            settings.student_preset,
            sum(p.numel() for p in model.parameters()) / 1e6,
        )
    check_same_tokenizer(teacher, student, trust)
    return student


@torch.no_grad()
def kl_to_teacher(student: Path, teacher: Path, texts: list[str], seq_len: int, trust_remote_code: bool) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 over the texts."""
    tokenizer = load_tokenizer(teacher, trust_remote_code)
    models = [
        load_model(AutoModelForCausalLM, p, trust_remote_code, dtype=torch.float32).eval() for p in (teacher, student)
    ]
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"]
        t_logits, s_logits = (m(input_ids=ids).logits for m in models)
        total += token_kl(t_logits, s_logits).item() * ids.shape[1]
        tokens += ids.shape[1]
    return round(total / max(tokens, 1), 5)


def run_distill(cfg: PipelineConfig, fresh: bool = False) -> dict:
    """`fresh`: discard earlier checkpoints instead of resuming them."""
    kept = curated_dir(cfg)
    out = cfg.stage_dir("distill")
    teacher = teacher_dir(cfg)
    student = build_student(cfg, teacher, out / "student")
    settings, trust, seq_len = cfg.distill, cfg.model.trust_remote_code, cfg.model.seq_len
    # the student trains in full, with distillation's own lr and steps
    train = cfg.train.model_copy(update={"lr": settings.lr, "max_steps": settings.max_steps, "full_finetune": True})
    inputs = {"student": path_digest(student), "teacher": path_digest(teacher), "data": path_digest(kept)}
    recipe = recipe_config(cfg, student, out).model_copy(
        update={"train": train, "objective": "distill", "distill": settings, "teacher": str(teacher), "inputs": inputs}
    )
    held_out = split_texts(kept, settings.eval_samples, held_out=True)
    measure = ray.remote(num_cpus=1)(kl_to_teacher)
    kl_before = ray.get(measure.remote(student, teacher, held_out, seq_len, trust))
    data = stage_datasets("pretrain", str(kept), str(student), trust, seq_len, cfg.train.padding_free)
    final, history = fit(cfg, recipe, out, data, fresh)
    kl_after = ray.get(measure.remote(final / "model", teacher, held_out, seq_len, trust))
    load_tokenizer(teacher, trust).save_pretrained(final / "model")
    summary = {
        "teacher": str(teacher),
        "student": str(final / "model"),
        "alpha": settings.alpha,
        "temperature": settings.temperature,
        "eval_documents": len(held_out),
        "kl_to_teacher_before": kl_before,
        "kl_to_teacher_after": kl_after,
        **history_summary(history),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "distill: KL(teacher || student) on %d held-out documents %.4f -> %.4f; student in %s",
        len(held_out),
        kl_before,
        kl_after,
        summary["student"],
    )
    return summary
