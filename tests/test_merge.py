"""The streamed LoRA merge gives the model peft's merge_and_unload gives, tensor by tensor from the
base's shards: same logits, the base's dtype kept (bf16 in, bf16 out), output split into shards that
transformers loads back."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.config import LoraSettings
from pipeline.merge import merge_adapter, stream_merge

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def logits(model_dir, dtype=torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def trained_adapter(base_dir, out, **settings) -> torch.Tensor:
    """An adapter on `base_dir` with non-zero B (and a changed lm_head when it is saved whole); returns
    the logits of peft's own in-memory merge, the reference."""
    torch.manual_seed(1)
    lora = LoraSettings(target_modules=["q_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"], **settings)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora.peft_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).merge_and_unload()
    with torch.no_grad():
        return reference.eval()(input_ids=IDS).logits.float()


def test_streamed_merge_matches_peft(tiny_model_dir, tmp_path):
    expected = trained_adapter(tiny_model_dir, tmp_path / "adapter")
    out = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", None, False)
    assert not (out / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(out), expected, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 64
    assert (out / "tokenizer.json").is_file()


def test_sharded_output_round_trips_to_identical_logits(tiny_model_dir, tmp_path):
    expected = trained_adapter(tiny_model_dir, tmp_path / "adapter")
    one, many = tmp_path / "one", tmp_path / "many"
    assert stream_merge(tiny_model_dir, tmp_path / "adapter", one, None, False)
    assert stream_merge(tiny_model_dir, tmp_path / "adapter", many, None, False, max_shard_bytes=200_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and index["metadata"]["total_size"] > 0
    assert torch.equal(logits(one), logits(many))
    torch.testing.assert_close(logits(many), expected, rtol=1e-5, atol=1e-5)
    # and the sharded model streams again, as the next stage's base does
    again = tmp_path / "again"
    assert stream_merge(many, None, again, None, False)
    assert torch.equal(logits(again), logits(many))


def test_a_bf16_base_gives_a_bf16_model(tiny_model_dir, tmp_path):
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    (base / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (base / "tokenizer_config.json").write_bytes((tiny_model_dir / "tokenizer_config.json").read_bytes())
    expected = trained_adapter(base, tmp_path / "adapter")
    out = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", None, False)
    weights = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in weights.parameters()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(logits(out, torch.bfloat16), expected, rtol=0.05, atol=0.05)


def test_an_adapter_that_is_not_plain_lora_is_merged_by_peft(tiny_model_dir, tmp_path):
    expected = trained_adapter(tiny_model_dir, tmp_path / "adapter", r=8)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["rank_pattern"] = {"o_proj": 8}  # the same ranks, spelled per layer: not streamed
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert not stream_merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "unused", None, False)
    assert not (tmp_path / "unused").exists()
    out = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", torch.float32, False)
    torch.testing.assert_close(logits(out), expected, rtol=1e-5, atol=1e-5)


def test_a_full_finetune_is_cast_to_the_asked_dtype(tiny_model_dir, tmp_path):
    out = merge_adapter(tiny_model_dir, tiny_model_dir, tmp_path / "cast", torch.bfloat16, False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(logits(out, torch.bfloat16), logits(tiny_model_dir, torch.bfloat16))


def test_an_adapter_trained_on_another_base_is_refused(tiny_model_dir, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.digest import path_digest

    trained_adapter(tiny_model_dir, tmp_path / "adapter")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    record = {"base_model": str(other), "base_digest": path_digest(other)}
    (tmp_path / "adapter" / "pipeline.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="is another model"):
        merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", None, False)
    assert not (tmp_path / "merged").exists()


def test_a_model_with_its_own_code_keeps_it(tiny_model_dir, tmp_path):
    """auto_map points at .py files beside the weights: the merged model needs them too (the whole
    remote-code path is tests/test_remote_code.py)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "modeling_mine.py").write_text("# the model's own code\n")
    trained_adapter(base, tmp_path / "adapter")
    out = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", None, False)
    assert (out / "modeling_mine.py").read_text() == "# the model's own code\n"
