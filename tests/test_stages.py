"""Train -> quantize on the tiny config: real Ray Train + DeepSpeed + peft, real
llm-compressor AWQ (serving: test_serve.py)."""

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration


def test_training_loss_goes_down(tiny_run):
    m = json.loads((tiny_run.stage_dir("train") / "metrics.json").read_text())
    losses = [h["loss"] for h in m["history"]]
    assert m["steps"] == tiny_run.train.max_steps == 30
    # a fresh tiny model starts near ln(vocab) = ln(1024) ~ 6.9 and must learn within 30 steps
    assert 6.0 < losses[0] < 8.0
    assert losses[-1] < losses[0] - 0.3, losses
    assert (tiny_run.stage_dir("train") / "loss.png").stat().st_size > 1000


def test_training_saved_a_lora_adapter_checkpoint(tiny_run):
    final = tiny_run.stage_dir("train") / "final"
    adapter_cfg = json.loads((final / "model" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert (final / "ds").is_dir(), "DeepSpeed optimizer state is checkpointed for resume"
    assert (tiny_run.stage_dir("train") / "pretrain" / "final" / "ds").is_dir(), "each stage keeps its own"
    assert json.loads((final / "state.json").read_text())["step"] == 30


def test_quantized_model_is_awq_int4_and_generates(tiny_run):
    out = tiny_run.stage_dir("quantize")
    report = json.loads((out / "quant_report.json").read_text())
    awq = out / report["quantized"]
    qcfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 128, "group")
    assert "lm_head" in qcfg["ignore"] and any(name.endswith("mlp.gate") for name in qcfg["ignore"])
    assert report["quantized_bytes"] < report["merged_bytes"]
    assert report["quantized_perplexity"] == pytest.approx(report["merged_perplexity"], rel=0.1)
    assert report["gate"] == {
        "max_ppl_increase": 0.02,
        "perplexity_change": report["perplexity_change"],
        "passed": True,
        "forced": False,
    }
    assert report["serve_model"] == "awq"
    assert report["merged_tokens_per_s"] > 0 and report["quantized_tokens_per_s"] > 0

    tok = AutoTokenizer.from_pretrained(awq)
    model = AutoModelForCausalLM.from_pretrained(awq)
    ids = tok("Permission is hereby granted", return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] == ids["input_ids"].shape[1] + 8


def test_merged_model_matches_adapter_model(tiny_run):
    from peft import PeftModel

    m = json.loads((tiny_run.stage_dir("train") / "metrics.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(m["base_model"], dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, m["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(tiny_run.stage_dir("quantize") / "merged", dtype=torch.float32).eval()
    ids = torch.randint(4, 500, (1, 24))
    with torch.no_grad():
        ref, got = lora(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(ref, got, atol=0.1), (ref - got).abs().max()  # bf16 merge


def test_held_out_split_is_never_trained_on(tiny_run):
    from pipeline.heldout import is_held_out, split_texts
    from pipeline.train.data import pack_documents

    kept = tiny_run.stage_dir("curate") / "kept"
    held, train = split_texts(kept, 10**6, held_out=True), split_texts(kept, 10**6, held_out=False)
    assert held and train and not set(held) & set(train)
    assert 0.02 < len(held) / (len(held) + len(train)) < 0.1  # 1 in 20 by id hash
    base = json.loads((tiny_run.stage_dir("train") / "metrics.json").read_text())["base_model"]
    ids = [i for i in (f"doc-{n}" for n in range(200)) if is_held_out(i)]
    docs = pd.DataFrame({"id": ids, "text": ["x " * 100] * len(ids)})
    assert pack_documents(docs, base, 16, held_out=False, trust_remote_code=False).num_rows == 0
    assert pack_documents(docs, base, 16, held_out=True, trust_remote_code=False).num_rows > 0


def test_distillation_lowers_the_students_kl_to_the_teacher(tiny_run, tmp_path):
    """Ray Train, 2 workers, the teacher (the merged 16-bit model) frozen beside each student."""
    import shutil

    from pipeline.train.distill import run_distill

    cfg = tiny_run.model_copy(deep=True)
    cfg.runs_dir = str(tmp_path)
    for stage in ("curate", "quantize"):
        shutil.copytree(tiny_run.stage_dir(stage), cfg.stage_dir(stage))
    cfg.distill.max_steps, cfg.distill.lr = 30, 3e-3
    m = run_distill(cfg)
    student = AutoModelForCausalLM.from_pretrained(m["student"])
    teacher = AutoModelForCausalLM.from_pretrained(m["teacher"])
    assert student.config.model_type == "qwen3" and teacher.config.model_type == "qwen3_moe"
    assert student.num_parameters() < teacher.num_parameters()
    assert m["eval_documents"] > 0 and m["steps"] == 30
    # a random student starts near KL ~ 1-2 nats/token from the teacher; 30 steps must cut it well down
    assert m["kl_to_teacher_after"] < 0.6 * m["kl_to_teacher_before"], m
    assert m["loss_last"] < m["loss_first"]


def test_quality_gate_stops_a_model_over_budget_unless_forced(tiny_run, tiny_corpus, tmp_path):
    """A tolerance no quantization can meet (perplexity must fall by half) must stop deployment."""
    import shutil

    from conftest import tiny_config
    from pipeline.errors import QualityGateError
    from pipeline.export.stage import run_quantize
    from pipeline.handoff import served_model_dir

    strict = tiny_config(tmp_path, tiny_corpus, "quantize.max_ppl_increase=-0.5")
    for stage in ("curate", "train"):
        shutil.copytree(tiny_run.stage_dir(stage), strict.stage_dir(stage))
    with pytest.raises(QualityGateError, match="over the -50.00% limit"):
        run_quantize(strict)
    report = json.loads((strict.stage_dir("quantize") / "quant_report.json").read_text())
    assert report["gate"]["passed"] is False and report["serve_model"] is None
    with pytest.raises(QualityGateError, match="--force"):
        served_model_dir(strict)
    forced = run_quantize(strict, force=True)
    assert forced["gate"]["forced"] is True
    assert served_model_dir(strict) == strict.stage_dir("quantize") / "awq"
