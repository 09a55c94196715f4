"""The training rules without Ray: what a worker is told (the recipe config of each stage and its
identity), the DeepSpeed config, batch sizes, the data formats, and the checks that fail before any
worker starts. The recipe itself runs on Ray Train in test_train.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import TINY, build_lock_holder
from pipeline.config import ConfigError, LoraSettings, load_config
from pipeline.train.recipe_config import recipe_config, stage_recipe


def test_a_changed_training_config_starts_a_fresh_ray_train_run(tmp_path):
    """Ray Train resumes a run of the same name; the name follows the recipe config, so a resubmitted
    job resumes while a changed config does not load checkpoints that do not fit it."""
    from pipeline.train.fit import run_name

    cfg = load_config(TINY, [f"runs_dir={tmp_path}"])
    recipe = recipe_config(cfg, Path("/base"), tmp_path / "out")
    out = cfg.stage_dir("train")
    assert run_name(cfg, recipe, out) == run_name(cfg, recipe.model_copy(), out)
    faster = recipe.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1.0})})
    assert run_name(cfg, recipe, out) != run_name(cfg, faster, out)
    elsewhere = recipe.model_copy(update={"output_dir": "/elsewhere"})
    assert run_name(cfg, recipe, out) == run_name(cfg, elsewhere, out), "where outputs go is no part of it"


def test_each_stage_gets_its_own_objective_lr_steps_and_ewc(tmp_path):
    cfg = load_config(
        TINY,
        [
            "train.lr=1e-3",
            "train.max_steps=30",
            "train.ewc.enabled=true",
            "train.stages="
            "[pretrain, {kind: sft, data: d.jsonl, lr: 1e-4}, {kind: dpo, data: p.jsonl, "
            "max_steps: 5, beta: 0.3}]",
        ],
    )
    pretrain, sft, dpo = (
        stage_recipe(
            cfg,
            spec,
            Path("/base"),
            tmp_path,
            first=i == 0,
            inputs={"base_model": "b", "data": "d", **({"previous_data": "p"} if i else {})},
        )
        for i, spec in enumerate(cfg.train.stages)
    )
    assert (pretrain.objective, pretrain.train.lr, pretrain.train.max_steps, pretrain.ewc) == (
        "causal_lm",
        1e-3,
        30,
        False,
    )
    assert (sft.objective, sft.train.lr, sft.train.max_steps, sft.ewc, sft.track_previous) == (
        "causal_lm",
        1e-4,
        30,
        True,
        True,
    )
    assert (dpo.objective, dpo.dpo_beta, dpo.train.max_steps, dpo.train.lr) == ("dpo", 0.3, 5, 1e-3)
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 30, "the pipeline's config is left as it was"
    with pytest.raises(Exception, match="frozen"):
        pretrain.base_model = "/other"
    assert pretrain.lora == cfg.train.lora
    assert recipe_config(load_config(TINY, ["train.full_finetune=true"]), Path("/b"), tmp_path).lora is None


def test_a_users_deepspeed_json_overrides_the_generated_config(tmp_path):
    from pipeline.train.strategy import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}))
    cfg = load_config("configs/tiny.yaml", [f"train.deepspeed_config={user}", "train.offload_optimizer=true"])
    ds = deepspeed_config(cfg.train, cfg.train.batch_size)
    assert ds["zero_optimization"] == {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "reduce_bucket_size": 1000,
    }
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 8


def test_auto_batch_size_starts_from_the_memory_rule_and_halves_on_oom():
    from pipeline.train.batch_size import halve_until_fits, memory_rule

    assert memory_rule(80 * 2**30, 2048, 896) == 256  # capped
    assert memory_rule(2 * 2**30, 4096, 4096) == 32
    assert memory_rule(1, 128, 128) == 1
    tried = []

    def step(batch: int) -> None:  # stands in for a GPU that fits 24 sequences
        tried.append(batch)
        if batch > 24:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert halve_until_fits(step, 256) == 16 and tried == [256, 128, 64, 32, 16]
    with pytest.raises(RuntimeError, match="gradient_checkpointing"):
        halve_until_fits(lambda b: step(100), 4)


def test_scale_presets_and_their_configs():
    from pipeline.model import HARDWARE, PRESETS

    for preset, low, high, config in (
        ("7b-dense", 6e9, 8e9, "configs/7b-lora.yaml"),
        ("66b-dense", 60e9, 70e9, "configs/66b-zero3.yaml"),
    ):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(PRESETS[preset](32000))
        assert low < sum(p.numel() for p in model.parameters()) < high
        cfg = load_config(config)
        assert cfg.model.preset == preset and config in HARDWARE[preset] and cfg.train.use_gpu
    assert load_config("configs/66b-zero3.yaml").train.zero_stage == 3


def test_bad_training_configs_fail_before_any_worker_starts(tiny_model_dir):
    from pipeline.train.stage import check_lora_targets

    with pytest.raises(ConfigError, match="DDP keeps a whole replica"):
        load_config("configs/tiny.yaml", ["train.strategy=ddp", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="ewc needs whole parameters"):
        load_config("configs/tiny.yaml", ["train.strategy=fsdp", "train.ewc.enabled=true"])
    with pytest.raises(ConfigError, match="does not support dropout"):
        load_config("configs/tiny.yaml", ["train.lora.target_parameters=[mlp.experts.down_proj]"])
    with pytest.raises(ConfigError, match="needs `data`"):
        load_config("configs/tiny.yaml", ["train.stages=[pretrain, sft]"])
    architecture = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] not found.*linear modules there: .*q_proj"):
        check_lora_targets(architecture, LoraSettings(target_modules=["qkv_proj"]), str(tiny_model_dir), False)
    with pytest.raises(ConfigError, match="mlp.experts.up_proj"):
        lora = LoraSettings(target_modules=["q_proj"], target_parameters=["mlp.experts.up_proj"], dropout=0)
        check_lora_targets(architecture, lora, str(tiny_model_dir), False)


def test_sft_labels_ignore_prompt_tokens_and_examples_do_not_see_each_other(tiny_model_dir):
    from pipeline.multitask import format_instruction
    from pipeline.train.data import IGNORE, pack_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recs = [{"task": "echo", "input": f"word{i}", "output": f"answer {i}"} for i in range(40)]
    table = pack_examples(pd.DataFrame(recs), str(tiny_model_dir), 64, held_out=False, trust_remote_code=False)
    ids, labels, positions = (np.array(table.column(c).to_pylist()) for c in ("input_ids", "labels", "position_ids"))
    first = tok(format_instruction("echo", "word0"), add_special_tokens=False)["input_ids"]
    row = list(labels[0])
    assert row[: len(first)] == [IGNORE] * len(first), "the prompt is not learned"
    response = tok("answer 0", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row[len(first) : len(first) + len(response)] == response
    assert positions[0][len(first) + len(response)] == 0, "the next packed example restarts its positions"
    assert (ids[labels != IGNORE] == labels[labels != IGNORE]).all()


def test_chat_records_use_the_tokenizers_chat_template(tiny_model_dir):
    from pipeline.train.formats import prompt_and_response

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(ValueError, match="no chat template"):
        prompt_and_response(record, tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert prompt_and_response(record, tok) == ("<|user|>hi\n<|assistant|>", "hello")


def test_distillation_refuses_a_student_with_another_tokenizer(tiny_model_dir, tmp_path):
    from pipeline.model import train_tokenizer
    from pipeline.train.distill import check_same_tokenizer

    other = tmp_path / "other"
    train_tokenizer(["completely different text " * 50], 300).save_pretrained(other)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    with pytest.raises(ConfigError, match="does not share the teacher's tokenizer"):
        check_same_tokenizer(tiny_model_dir, other, trust_remote_code=False)


def test_the_run_name_follows_the_fingerprints_of_what_it_reads(tmp_path):
    from pipeline.train.fit import run_name

    cfg = load_config(TINY, [f"runs_dir={tmp_path}"])
    recipe = recipe_config(cfg, Path("/base"), tmp_path / "out").model_copy(update={"inputs": {"base_model": "a1"}})
    rebuilt = recipe.model_copy(update={"inputs": {"base_model": "b2"}})
    assert run_name(cfg, recipe, tmp_path) != run_name(cfg, rebuilt, tmp_path)


def test_fingerprints_see_a_rewritten_file_and_not_a_renamed_one(tmp_path):
    import numpy as np

    from pipeline.digest import path_digest

    weights = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(weights)
    before = path_digest(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").rename(tmp_path / "a" / "shard-0.safetensors")
    assert path_digest(tmp_path / "a") == before
    (tmp_path / "a" / "shard-0.safetensors").write_bytes(np.random.default_rng(1).bytes(3 << 20))  # retrained
    assert path_digest(tmp_path / "a") != before
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    first = path_digest(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    assert path_digest(tmp_path / "b.jsonl") != first


def test_a_frozen_base_and_deepspeed_models_load_in_16_bits():
    """DeepSpeed casts the model to bf16/fp16 itself: loading in that dtype skips a whole fp32 copy per
    worker. A LoRA run's frozen base is 16-bit on every strategy; DDP and FSDP2 keep a fully trained
    model in fp32 (their master weights); fp32 runs stay fp32."""
    from pipeline.train.recipe import load_dtype

    def dtype(*overrides):
        return load_dtype(load_config(TINY, ["train.use_gpu=true", *overrides]).train)

    assert dtype() == torch.bfloat16  # precision auto on GPUs: bf16
    assert dtype("train.precision=fp16") == torch.float16
    assert dtype("train.precision=fp32") == torch.float32
    assert dtype("train.full_finetune=true") == torch.bfloat16
    for strategy in ("fsdp", "ddp"):
        assert dtype(f"train.strategy={strategy}", "train.zero_stage=null") == torch.bfloat16  # LoRA
        assert dtype(f"train.strategy={strategy}", "train.zero_stage=null", "train.full_finetune=true") == torch.float32
    assert load_dtype(load_config(TINY).train) == torch.float32  # CPU workers: fp32


def test_a_checkpoint_is_whole_only_when_every_ranks_manifest_matches_its_files(tmp_path):
    """What a resume checks before loading: each rank's manifest is there and every file it lists has
    the size and SHA-256 that rank wrote. The damage is named, so the warning can say which file."""
    from pipeline.train.checkpoint_manifest import damage, write_manifest

    for rank, files in enumerate([{"state.json": b"{}", "model/adapter.safetensors": b"w" * 64}, {"shard1.pt": b"s"}]):
        rank_dir = tmp_path / f"rank{rank}"  # what each rank had before Ray gathered the folders into one
        for name, data in files.items():
            (rank_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (rank_dir / name).write_bytes(data)
        write_manifest(rank_dir, rank, world_size=2)
    whole = tmp_path / "checkpoint"
    for rank_dir in (tmp_path / "rank0", tmp_path / "rank1"):
        for path in rank_dir.rglob("*"):
            if path.is_file():
                (whole / path.relative_to(rank_dir)).parent.mkdir(parents=True, exist_ok=True)
                (whole / path.relative_to(rank_dir)).write_bytes(path.read_bytes())
    assert damage(whole) is None

    weights = whole / "model" / "adapter.safetensors"
    weights.write_bytes(b"w" * 32)
    assert damage(whole) == "model/adapter.safetensors has 32 bytes, 64 were written"
    weights.write_bytes(b"x" * 64)
    assert damage(whole) == "model/adapter.safetensors does not hold what was written (its SHA-256 differs)"
    weights.write_bytes(b"w" * 64)
    (whole / "shard1.pt").unlink()
    assert damage(whole) == "shard1.pt is missing"
    (whole / "manifest.rank1.json").unlink()
    assert damage(whole).startswith("manifest.rank1.json is missing or unreadable")


def test_where_picks_curated_documents_by_id_source_or_meta_globs():
    from pipeline.train.data import document_matches

    row = {"id": "libfoo/0", "source": "data/corpus/part-01.jsonl", "meta": '{"customer": "acme", "year": 2024}'}
    assert document_matches(row, {})
    assert document_matches(row, {"id": "lib*", "customer": "acme"})
    assert document_matches(row, {"source": "*/part-0[01].jsonl", "year": "2024"})
    assert not document_matches(row, {"id": "lib*", "customer": "globex"})
    assert not document_matches({**row, "meta": ""}, {"customer": "*"})  # a field the document lacks
    assert not document_matches(row, {"id": "LIB*"})  # globs are case-sensitive, as ids are


def test_adapters_train_at_once_as_far_as_the_cluster_holds_their_worker_groups():
    from pipeline.train.adapt import adapters_at_once

    cfg = load_config(TINY)  # 2 workers of 0.5 CPU: a group takes 1 CPU
    assert adapters_at_once(cfg, 5, {"CPU": 2}) == 1  # one CPU stays free for data tasks
    assert adapters_at_once(cfg, 5, {"CPU": 16}) == 5 and adapters_at_once(cfg, 2, {"CPU": 16}) == 2
    assert adapters_at_once(cfg, 5, {"CPU": 0.5}) == 1  # never none: one at a time waits for room
    gpus = load_config(TINY, ["train.use_gpu=true", "train.num_workers=1", "train.cpus_per_worker=8"])
    assert adapters_at_once(gpus, 8, {"CPU": 64, "GPU": 8}) == 7  # CPUs bind first: (64 - 1) // 8
    assert adapters_at_once(gpus, 8, {"CPU": 128, "GPU": 4}) == 4
    assert adapters_at_once(load_config(TINY, ["adapters_at_once=2"]), 5, {"CPU": 2}) == 2  # the user's word


def test_a_finished_runs_checkpoint_is_the_result_only_when_it_is_whole(tmp_path):
    """A rerun of a run at its last step copies that checkpoint as the result, starting no worker group;
    a damaged one is left for the recipe, which passes over it."""
    from pipeline.train.checkpoint_manifest import write_manifest
    from pipeline.train.fit import take_whole

    checkpoint = tmp_path / "run" / "checkpoint_1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 10}')
    write_manifest(checkpoint, 0, 1)
    assert take_whole(str(checkpoint), str(tmp_path / "run"), tmp_path / "final")
    assert (tmp_path / "final" / "state.json").read_text() == '{"step": 10}'
    (checkpoint / "state.json").write_text('{"step": 19}')  # same size, other bytes
    assert not take_whole(str(checkpoint), str(tmp_path / "run"), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_tokenizer_is_loaded_once_per_worker_until_its_files_change(tmp_path):
    """Task workers outlive stages, so the per-process tokenizer cache is keyed on the files as well as the
    path: a model rebuilt at the same path (the README walkthrough does this) is tokenized with its own."""
    from pipeline.model import train_tokenizer
    from pipeline.train.data import _tokenizer

    texts = [f"document {i} about {w}" for i in range(50) for w in ("cats", "dogs", "ships")]
    train_tokenizer(texts, 270).save_pretrained(tmp_path)
    first = _tokenizer(str(tmp_path), False)
    assert _tokenizer(str(tmp_path), False) is first
    train_tokenizer(texts, 290).save_pretrained(tmp_path)
    rebuilt = _tokenizer(str(tmp_path), False)
    assert rebuilt is not first and len(rebuilt) != len(first)


def test_a_build_lock_is_removed_only_once_no_living_process_holds_it(tmp_path):
    """torch's loader keeps its build lock open until it removes it, so an open lock is a live build."""
    from pipeline.train.jit_ops import remove_dead_lock

    lock = tmp_path / "lock"
    loader = build_lock_holder(lock)
    assert not remove_dead_lock(lock) and lock.exists()
    loader.kill()
    loader.wait()
    assert remove_dead_lock(lock) and not lock.exists()
    assert not remove_dead_lock(lock)


def test_every_op_deepspeed_builds_on_cpu_loads_through_the_guard():
    """The communication op every CPU run loads, and those a user's DeepSpeed JSON can bring in (the Adam of
    an offloaded optimizer without torch_adam, fused Adam, Adagrad, Lion): each builder's JIT load is the
    guarded one, and guarding twice wraps once. In a child process: the guard stays for its process."""
    code = (
        "from deepspeed.accelerator import get_accelerator\n"
        "from deepspeed.ops.op_builder.builder import OpBuilder\n"
        "from pipeline.train.jit_ops import guard_op_loads\n"
        "guard_op_loads(); guard_op_loads()\n"
        "print(hasattr(OpBuilder.jit_load.__wrapped__, 'guarded'))\n"
        "for name in ['ShareMemCommBuilder', 'CPUAdamBuilder', 'FusedAdamBuilder', 'CPUAdagradBuilder', "
        "'CPULionBuilder']:\n"
        "    print(name, getattr(get_accelerator().create_op_builder(name).jit_load, 'guarded', False))\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == "False", "the guard wraps DeepSpeed's own jit_load, not itself"
    assert lines[1:6] == [
        f"{name} True"
        for name in ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder", "CPUAdagradBuilder", "CPULionBuilder")
    ]
