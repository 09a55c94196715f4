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


def test_adapters_train_on_the_runs_model_from_their_own_data_and_serve_on_its_4_bit_export(tiny_run, tmp_path):
    """Two adapters (two tasks of the shipped instructions) trained at the same time on the run's 16-bit
    model, the second then aligned on the shipped preferences (sft, then dpo), and a third on a part of
    the curated corpus (pretrain where id matches c*): each lands as a peft folder with its manifest,
    lowers its own held-out loss, fits the AWQ model the endpoint serves, and changes its answers; the
    two-stage one is one adapter of twice the rank that changes the model as its stages did in turn; a
    second run with the same inputs trains nothing."""
    import shutil
    from pathlib import Path

    from pipeline.config import AdapterSpec, ConfigError
    from pipeline.digest import path_digest
    from pipeline.handoff import merged_model_dir, served_model_dir
    from pipeline.loading import check_adapter_base, load_adapter, load_model, load_tokenizer
    from pipeline.serving.transformers_engine import load_with_adapters
    from pipeline.train.adapt import run_adapt, run_adapters

    cfg = tiny_run.model_copy(deep=True)
    cfg.runs_dir = str(tmp_path / "runs")
    for stage in ("curate", "quantize"):
        shutil.copytree(tiny_run.stage_dir(stage), cfg.stage_dir(stage))
    records = [json.loads(line) for line in Path("data/instructions.jsonl").read_text().splitlines()]
    lora = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "modules_to_save": []}
    for name, task in (("counts", "license-count"), ("names", "upstream-name")):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records if r["task"] == task))
        stages = [{"kind": "sft", "data": str(data), "max_steps": 20, "lr": 5e-3}]
        if name == "names":
            stages.append({"kind": "dpo", "data": "data/preferences.jsonl", "max_steps": 8, "lr": 5e-3})
        cfg.adapters.append(AdapterSpec(name=name, stages=stages, lora=lora))
    # packages named c*: 45 documents to train on, 3 held out; 10 steps at this rate overshot (5.933 -> 5.949)
    part = {"kind": "pretrain", "where": {"id": "c*"}, "max_steps": 20, "lr": 5e-3}
    cfg.adapters.append(AdapterSpec(name="c-packages", stages=[part], lora=lora))
    with pytest.raises(ConfigError, match="no adapter 'other' in this config; it has: counts, names, c-packages"):
        run_adapt(cfg, "other")

    merged, awq = merged_model_dir(cfg), served_model_dir(cfg)
    cfg.adapters_at_once = 2  # two worker groups of 1 CPU on the 2-CPU test cluster: the two instruction adapters
    manifests = run_adapters(cfg, ["counts", "names"])
    assert manifests["names"]["trained"]["started"] < manifests["counts"]["trained"]["finished"]
    assert manifests["counts"]["trained"]["started"] < manifests["names"]["trained"]["finished"]  # at once
    part = run_adapt(cfg, "c-packages")  # alone: it streams the corpus, whose read tasks need a free CPU
    assert part["stages"][0]["where"] == {"id": "c*"} and part["metrics"][0]["steps"] == 20
    assert part["quantized_base"]["eval_documents"] > 0  # scored on held-out documents of its part
    assert part["metrics"][0]["eval_loss_last"] < part["metrics"][0]["eval_loss_before"], part["metrics"]
    with pytest.raises(ConfigError, match=r"no curated document .* matches where=\{'id': 'nothing\*'\}; its fields"):
        cfg.adapters[2].stages[0].where = {"id": "nothing*"}
        run_adapt(cfg, "c-packages")
    for name, m in manifests.items():
        folder = cfg.stage_dir("adapters") / name
        assert {"adapter_config.json", "adapter_model.safetensors", "pipeline.json", "manifest.json"} <= {
            f.name for f in folder.iterdir()
        }
        assert m["base_digest"] == path_digest(merged)
        assert m["stages"][0]["data_digest"] == path_digest(tmp_path / f"{name}.jsonl")
        sft = m["metrics"][0]
        assert sft["steps"] == 20 and m["lora"]["r"] == 8
        assert sft["eval_loss_last"] < 0.97 * sft["eval_loss_before"], sft  # ~5% in 20 steps
        check_adapter_base(folder, awq)  # trained on the 16-bit model, it fits its 4-bit export
        q = m["quantized_base"]  # the quality gate, per adapter: its held-out perplexity over either base
        assert q["eval_documents"] > 0 and q["merged_perplexity"] > 1 and q["quantized_perplexity"] > 1, q
        assert q["perplexity_change"] == round(q["quantized_perplexity"] / q["merged_perplexity"] - 1, 4)
        assert q["passed"] == (q["perplexity_change"] <= cfg.quantize.max_ppl_increase)
    assert [s["kind"] for s in manifests["names"]["stages"]] == ["sft", "dpo"] and manifests["names"]["rank"] == 16
    assert manifests["counts"]["rank"] == 8 and manifests["names"]["metrics"][1]["steps"] == 8

    # the stacked adapter on the run's model = the dpo stage's adapter on the model the sft stage left
    dpo = cfg.stage_dir("adapters") / "names" / "dpo"
    prompt = load_tokenizer(merged)(["[TASK] upstream-name\n[INPUT] package gpgsm\n[OUTPUT] "], return_tensors="pt")
    with torch.no_grad():  # in float32: the two differ only by the sft model's rounding to bf16 when merged
        run_model = load_model(AutoModelForCausalLM, merged, dtype=torch.float32)
        before = run_model(**prompt).logits
        stacked = load_adapter(run_model, cfg.stage_dir("adapters") / "names")(**prompt).logits
        dpo_adapter = manifests["names"]["metrics"][1]["model"]
        in_turn = load_adapter(load_model(AutoModelForCausalLM, dpo / "base", dtype=torch.float32), dpo_adapter)
        in_turn = in_turn(**prompt).logits
    gap, effect = (stacked - in_turn).abs().max(), (stacked - before).abs().max()
    assert gap < 0.05 * effect, (gap, effect)

    adapters = {name: cfg.stage_dir("adapters") / name for name in manifests}
    model = load_with_adapters(str(awq), False, adapters)
    tokenizer = load_tokenizer(awq)
    enc = tokenizer(["[TASK] license-count\n[INPUT] package gpgsm\n[OUTPUT] "] * 3, return_tensors="pt")
    with torch.no_grad():  # one batch, a row per model: the tiny model's greedy text is mostly newlines
        logits = model(**enc, adapter_names=["__base__", "counts", "names"]).logits[:, -1]
    assert min((logits[i] - logits[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 0.1, logits

    weights = adapters["counts"] / "adapter_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert run_adapt(cfg, "counts") == manifests["counts"]  # same base, data and settings: nothing trained
    assert weights.stat().st_mtime_ns == written
