"""The export rules without Ray: the quality gate's decision, and refusing what could not be loaded back."""

import pytest

from pipeline.config import ConfigError


def test_quality_gate_decisions():
    from pipeline.export.stage import gate

    ok = gate({"perplexity_change": 0.015}, 0.02, force=False)
    assert ok["gate"]["passed"] and ok["serve_model"] == "awq"
    bad = gate({"perplexity_change": 0.05}, 0.02, force=False)
    assert not bad["gate"]["passed"] and bad["serve_model"] is None
    forced = gate({"perplexity_change": 0.05}, 0.02, force=True)
    assert forced["gate"]["forced"] and forced["serve_model"] == "awq"


def test_asymmetric_awq_of_moe_experts_is_refused_before_calibrating(tiny_model_dir):
    from pipeline.export.awq import check_supported

    check_supported(tiny_model_dir, symmetric=True, trust_remote_code=False)
    with pytest.raises(ConfigError, match="quantize.symmetric=true"):
        check_supported(tiny_model_dir, symmetric=False, trust_remote_code=False)


def test_pipeline_run_counts_the_gates_documents_right_after_curate(tmp_path):
    """A corpus with too few held-out documents for quantize.eval_samples stops `pipeline run` before
    training (check_gate_before_training), with the numbers; exactly enough passes; --force only warns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import TINY
    from pipeline.config import load_config
    from pipeline.errors import QualityGateError
    from pipeline.export.stage import check_gate_before_training
    from pipeline.heldout import is_held_out

    ids = [f"doc-{i}" for i in range(200)]
    held = sum(map(is_held_out, ids))
    assert 0 < held < 200
    cfg = load_config(TINY, [f"runs_dir={tmp_path}", f"quantize.eval_samples={held + 1}"])
    kept = cfg.stage_dir("curate") / "kept"
    kept.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "text": [f"text {i}" for i in ids]}), kept / "part-0.parquet")
    too_few = f"eval_samples={held + 1}, but the curated corpus .* has only {held} held-out"
    with pytest.raises(QualityGateError, match=too_few):
        check_gate_before_training(cfg)
    check_gate_before_training(cfg, force=True)
    check_gate_before_training(load_config(TINY, [f"runs_dir={tmp_path}", f"quantize.eval_samples={held}"]))


def test_perplexity_is_the_language_models_alone_even_when_its_config_asks_for_router_logits(tiny_model_dir):
    """The quality gate's perplexity is exp(next-token cross-entropy): an MoE model whose saved config asks
    for its router's logits (fully fine-tuned before the recipe stopped saving that) gets the same score,
    not its `loss`, which then carries the balancing loss too."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_tokenizer
    from pipeline.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["Permission is hereby granted, free of charge, to any person", "Copyright (C) the authors"]
    plain, first = perplexity(model, tokenizer, texts, 32), perplexity(model, tokenizer, texts[:1], 32)
    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert first == pytest.approx(math.exp(model(ids, labels=ids).loss))
        model.config.output_router_logits = True
        with_balancing = math.exp(model(ids, labels=ids).loss)
    assert with_balancing > first * 1.001  # what the gate read from such a model before
    assert perplexity(model, tokenizer, texts, 32) == pytest.approx(plain, rel=1e-6)
