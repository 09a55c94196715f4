"""model.trust_remote_code reaches every load: a model whose config and class live in code it ships
(auto_map, a model type transformers does not know) goes through curate (as the perplexity filter's
reference model), train, quantize (merge, AWQ, the gate's measurements), distill (as the teacher) and
serve, and is refused with the key's name when the key is not set."""

import json

import pytest
from ray import serve
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from pipeline.config import ConfigError
from pipeline.model import PRESETS, train_tokenizer

pytestmark = pytest.mark.integration

CONFIG_CODE = """from transformers import Qwen3Config


class ShippedConfig(Qwen3Config):
    model_type = "shipped-qwen3"
"""
MODEL_CODE = """from transformers import Qwen3ForCausalLM

from .configuration_shipped import ShippedConfig


class ShippedForCausalLM(Qwen3ForCausalLM):
    config_class = ShippedConfig
"""


@pytest.fixture(scope="module")
def shipped_model(tiny_corpus, tmp_path_factory):
    """tiny-dense weights under a model type that only the directory's own code defines."""
    out = tmp_path_factory.mktemp("shipped")
    texts = [
        json.loads(line)["text"]
        for line in (tiny_corpus / "part-00.jsonl").read_text().splitlines()[:200]
        if '"text": "' in line and "planted" not in line
    ]
    tokenizer = train_tokenizer(texts, 512)
    AutoModelForCausalLM.from_config(PRESETS["tiny-dense"](len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "configuration_shipped.py").write_text(CONFIG_CODE)
    (out / "modeling_shipped.py").write_text(MODEL_CODE)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="shipped-qwen3",
        architectures=["ShippedForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_shipped.ShippedConfig",
            "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM",
        },
    )
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_model_that_ships_its_code_runs_through_every_stage_when_trusted(
    ray_local, tiny_corpus, shipped_model, tmp_path
):
    from pipeline.curate.stage import run_curate
    from pipeline.export.stage import run_quantize
    from pipeline.serving.deploy import deploy, generate
    from pipeline.train.distill import run_distill
    from pipeline.train.stage import run_train

    cfg = tiny_config(
        tmp_path,
        tiny_corpus,
        f"model.path={shipped_model}",
        "model.trust_remote_code=true",
        f"data.input=[{tiny_corpus}/part-00.jsonl]",  # half the corpus: it only has to flow through
        f"data.perplexity.model_path={shipped_model}",
        "data.perplexity.max_perplexity=1e12",
        "data.perplexity.max_tokens=32",
        "train.max_steps=4",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        "train.lora.modules_to_save=[]",
        "quantize.max_ppl_increase=100",
        "quantize.calib_samples=8",
        "quantize.eval_samples=2",
        "distill.max_steps=2",
        "distill.eval_samples=2",
    )
    stats = run_curate(cfg)
    assert stats["kept"] > 0 and "perplexity" in stats["seconds"]
    untrusted = cfg.model_copy(deep=True)
    untrusted.model.trust_remote_code = False
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        run_train(untrusted)
    assert run_train(cfg)["steps"] == 4
    report = run_quantize(cfg)
    assert report["serve_model"] == "awq" and report["quantized_perplexity"] > 0
    merged = json.loads((cfg.stage_dir("quantize") / "merged" / "config.json").read_text())
    assert merged["model_type"] == "shipped-qwen3", "the merged model is still the shipped class"
    assert run_distill(cfg)["steps"] == 2
    try:
        reply = generate(deploy(cfg), "Permission is hereby granted", 4)
    finally:
        serve.shutdown()
    assert reply["completion_tokens"] >= 1
