"""Streaming a checkpoint into a sharded model (train/streamed_load.py), without Ray: the names it maps, which
checkpoints it streams, LoRA's initial values on a model built on the meta device, and FSDP2 shards filled
a decoder layer at a time on a one-process group, against the model `from_pretrained` loads. The 2-worker
runs under ZeRO-3 and FSDP2 are in test_train.py."""

import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

from pipeline.loading import Checkpoint
from pipeline.train.streamed_load import (
    ConvertedCheckpoint,
    adapter_initial_values,
    base_key,
    empty_model,
    fill_partitions,
    no_random_init_under_zero3,
    rank0_source,
    send_shards,
    streams,
)

SMALL = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SMALL |= {"num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "initializer_range": 0.2}


def saved(tmp_path, config, **save):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, **save)
    return tmp_path


def skeleton(model_dir):
    return empty_model(AutoConfig.from_pretrained(model_dir))


def test_a_peft_models_parameter_names_map_to_the_base_checkpoints():
    assert base_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert base_key("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert base_key("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert base_key("model.norm.weight") == "model.norm.weight"  # a plain model's names are the checkpoint's


def test_a_checkpoint_in_several_files_reads_each_tensor_as_saved(tmp_path):
    model_dir = saved(tmp_path, Qwen3Config(**SMALL, tie_word_embeddings=False), max_shard_size="60KB")
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) > 1 and (model_dir / "model.safetensors.index.json").is_file()
    checkpoint = Checkpoint(model_dir)
    for file in files:
        for key, tensor in load_file(file).items():
            assert torch.equal(checkpoint.read(key), tensor), key
    assert streams(skeleton(model_dir), checkpoint)


def test_a_tied_head_streams_and_fused_moe_experts_stream_through_transformers_conversion(tmp_path):
    """A tied head is stored once, under the embedding's name. transformers 5 stores MoE experts one by one
    and fuses them into 3-D parameters as it loads: read through ConvertedCheckpoint, each fused parameter
    is made from its experts' tensors as from_pretrained makes it, so the checkpoint streams."""
    tied = saved(tmp_path / "tied", Qwen3Config(**SMALL, tie_word_embeddings=True))
    assert "lm_head.weight" not in Checkpoint(tied) and streams(skeleton(tied), Checkpoint(tied))
    experts = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    moe = saved(tmp_path / "moe", Qwen3MoeConfig(**SMALL, **experts))
    assert any(".experts.0." in key for key in Checkpoint(moe).file_of)
    assert not streams(skeleton(moe), Checkpoint(moe))  # as stored, the fused names are not there
    view = ConvertedCheckpoint(Checkpoint(moe), skeleton(moe))
    assert streams(skeleton(moe), view)
    loaded = AutoModelForCausalLM.from_pretrained(moe).state_dict()
    assert {name for name in loaded if ".experts." in name} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }
    for name, tensor in loaded.items():
        assert torch.equal(view.read(name), tensor), name


def test_lora_on_a_model_built_on_the_meta_device_starts_as_peft_starts_it(tmp_path):
    model_dir = saved(tmp_path, Qwen3Config(**SMALL))
    model = get_peft_model(skeleton(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    initial = adapter_initial_values(model)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert initial.keys() == lora.keys() and len(lora) == 8
    for name, value in initial.items():
        assert value.shape == lora[name].shape and value.dtype == torch.float32
        if "lora_B" in name:
            assert not value.any(), name  # the adapter adds nothing before it trains
        else:
            bound = 1 / value.shape[1] ** 0.5  # nn.Linear's kaiming-uniform bound
            assert 0 < value.abs().max() <= bound, name
    real = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(model.base_model.model.model.rotary_emb.inv_freq, real.model.rotary_emb.inv_freq)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class CountedCheckpoint(Checkpoint):
    """Counts the bytes of the tensors it has read that are still alive, and the most at any time."""

    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.alive = self.most = 0

    def read(self, key):
        tensor = super().read(key)
        self.alive += tensor.nbytes
        self.most = max(self.most, self.alive)
        weakref.finalize(tensor, self._freed, tensor.nbytes)
        return tensor

    def _freed(self, nbytes):
        self.alive -= nbytes


DEEP = Qwen3Config(**(SMALL | {"num_hidden_layers": 8}), tie_word_embeddings=False)  # no unit near half of it
DEEP_MOE = Qwen3MoeConfig(
    **(SMALL | {"num_hidden_layers": 8}), tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2
)  # its experts stored one by one, fused as they stream


def unit_bytes(model_dir):
    """The checkpoint's bytes in all, and those of its largest decoder layer or of the rest."""
    tensors = load_file(model_dir / "model.safetensors")
    units = {}
    for key, tensor in tensors.items():
        unit = ".".join(key.split(".")[:3]) if ".layers." in key else "rest"
        units[unit] = units.get(unit, 0) + tensor.nbytes
    return sum(units.values()), max(units.values())


@pytest.mark.parametrize("config", [DEEP, DEEP_MOE], ids=["dense", "moe"])
def test_fsdp2_shards_filled_a_layer_at_a_time_give_the_loaded_models_logits(tmp_path, one_process_group, config):
    from torch.distributed.fsdp import fully_shard

    model_dir = saved(tmp_path / "model", config)
    checkpoint = CountedCheckpoint(model_dir)
    model = get_peft_model(skeleton(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    source = rank0_source(model, ConvertedCheckpoint(checkpoint, skeleton(model_dir)))
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    send_shards(model, source)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    lora_b = [p.full_tensor() for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and not any(b.any() for b in lora_b)
    whole, largest = unit_bytes(model_dir)
    assert checkpoint.most <= 2 * largest < whole / 2, (checkpoint.most, largest, whole)  # never the whole model


@pytest.mark.integration  # DeepSpeed compiles its CPU communication op on first use (~35 s)
@pytest.mark.parametrize("config", [DEEP, DEEP_MOE], ids=["dense", "moe"])
def test_zero3_partitions_filled_a_module_at_a_time_give_the_loaded_models_logits(tmp_path, monkeypatch, config):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        model_dir = saved(tmp_path / "model", config)
        checkpoint = CountedCheckpoint(model_dir)
        view = ConvertedCheckpoint(checkpoint, skeleton(model_dir))  # as the recipe does: before zero.Init is on
        settings = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
        with no_random_init_under_zero3():  # what the recipe does: fill overwrites every parameter
            model = AutoModelForCausalLM.from_config(config)  # partitioned as it is built: zero.Init
        assert all(hasattr(p, "ds_tensor") for p in model.parameters())
        fill_partitions(model, view)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
            logits = model(ids).logits
        unset_hf_deepspeed_config()
        del settings
        torch.testing.assert_close(logits, AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits)
        whole, largest = unit_bytes(model_dir)
        assert checkpoint.most <= largest < whole / 2, (checkpoint.most, largest, whole)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_zero3_without_random_weights_still_computes_the_buffers_as_transformers_does(tmp_path, monkeypatch):
    """In bf16, zero.Init makes RoPE's frequencies in bf16 arithmetic as the model is built; transformers then
    computes them again in its initialization. Skipping the random weights must not skip that."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        bf16 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
        settings = HfDeepSpeedConfig(bf16)
        drawn = AutoModelForCausalLM.from_config(DEEP, dtype=torch.bfloat16)
        with no_random_init_under_zero3():
            model = AutoModelForCausalLM.from_config(DEEP, dtype=torch.bfloat16)
        unset_hf_deepspeed_config()
        del settings
        buffers = dict(drawn.named_buffers())
        assert buffers
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, buffers[name]), name
    finally:
        dist.destroy_process_group()


FREED = """
import sys, torch
from pipeline.train.memory import resident_bytes, return_freed_memory
if sys.argv[1] == "fixed":
    return_freed_memory()
before = resident_bytes()
torch.empty(2**21).fill_(1)
big, small = [], []
for _ in range(60):  # 8 MiB tensors, each followed by a 256 KiB one that stays: a heap cannot shrink past it
    big.append(torch.ones(2**21))
    small.append(torch.ones(2**16))
del big
print((resident_bytes() - before) / 2**20)
"""


def test_a_worker_gives_freed_tensors_memory_back_instead_of_keeping_it_in_the_heap():
    """glibc's default keeps the 480 MiB of freed tensors (once the first was freed, their size came from its
    heap, each below a tensor still in use); after return_freed_memory each went back to the OS as it was
    freed, and only the 15 MiB still in use stays."""

    def grown(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, check=True).stdout)

    assert grown("default") > 400 and grown("fixed") < 40
