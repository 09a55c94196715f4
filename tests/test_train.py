"""Ray Train recipes on CPU workers (gloo), 2 workers, real DeepSpeed / FSDP2 / DDP and peft, on the
tiny Qwen3-MoE: strategies, staged pretrain -> SFT -> DPO, early stopping, fault restart, EWC.
(The rules around them, without Ray: test_train_rules.py.)"""

import json
from pathlib import Path

import pytest
import ray
import torch

from conftest import derived_config

pytestmark = pytest.mark.integration


def history(cfg, stage: str = "pretrain") -> list[dict]:
    return json.loads((cfg.stage_dir("train") / stage / "metrics.json").read_text())["history"]


def test_training_writes_tensorboard_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run.stage_dir("train") / "pretrain" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/moe_aux_loss",
        "train/moe_max_load",
        "eval/eval_loss",
    } <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 5, 10, 15, 20, 25, 30]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [10, 20, 30]
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert all(1.0 <= e.value <= 4.0 for e in events.Scalars("train/moe_max_load"))  # 4 experts: 1 even, 4 one-hot


def test_zero2_lora_on_moe_experts_resumes_a_failed_worker_from_its_checkpoint(tiny_run, tmp_path):
    """Worker 0 raises at step 8; Ray Train restarts the group, which resumes from the step-5
    checkpoint: the step count continues (6, 7, ...), it does not start over."""
    cfg = derived_config(
        tiny_run,
        tmp_path,
        "train.max_steps=12",
        "train.checkpoint_every=5",
        "train.inject_fault_at_step=8",
        "train.router_aux_loss_coef=0.02",
        "train.lora.target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj]",
        "train.lora.dropout=0",
    )
    from pipeline.train.stage import run_train

    run_train(cfg)
    final = cfg.stage_dir("train") / "final"
    state = json.loads((final / "state.json").read_text())
    assert state["resumed_at"] == [5] and state["step"] == 12
    assert state["micro_batches"] == 12, "the data position continued too"
    steps = [h["step"] for h in state["history"]]
    assert steps == [1, 5, 10, 12], steps
    losses = [h["loss"] for h in state["history"]]
    assert 6.0 < losses[0] < 8.0 and losses[-1] < losses[0] - 0.3, losses
    adapter = json.loads((final / "model" / "adapter_config.json").read_text())
    assert set(adapter["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


def test_zero3_trains_the_moe_model_with_lora_and_saves_whole_adapter_tensors(tiny_run, tmp_path):
    """ZeRO-3 shards every parameter; the MoE blocks are ZeRO-3 leaf modules (without that, ranks
    whose tokens pick different experts wait on each other forever). The base's experts, stored one by one,
    are fused as rank 0 streams them into the partitions (no worker loads the whole model)."""
    from safetensors.torch import load_file

    from pipeline.train.stage import run_train

    cfg = derived_config(tiny_run, tmp_path, "train.zero_stage=3", "train.max_steps=15", "train.checkpoint_every=15")
    m = run_train(cfg)
    assert m["history"][0]["weights_streamed"], m["history"][0]
    losses = [h["loss"] for h in m["history"]]
    assert 6.0 < losses[0] < 8.0 and losses[-1] < losses[0] - 0.3, losses
    weights = load_file(cfg.stage_dir("train") / "final" / "model" / "adapter_model.safetensors")
    lora_a = [t for name, t in weights.items() if "lora_A" in name]
    assert lora_a and all(t.shape == (16, 128) for t in lora_a)  # whole tensors, not empty ZeRO-3 shards


def test_fsdp_with_gradient_checkpointing_trains_and_writes_profiler_traces(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from pipeline.train.stage import run_train

    cfg = derived_config(
        tiny_run,
        tmp_path,
        "train.strategy=fsdp",
        "train.gradient_checkpointing=true",
        "train.profile=true",
        "train.max_steps=15",
        "train.checkpoint_every=15",
    )
    m = run_train(cfg)
    assert m["history"][0]["weights_streamed"], m["history"][0]
    losses = [h["loss"] for h in m["history"]]
    assert 6.0 < losses[0] < 8.0 and losses[-1] < losses[0] - 0.3, losses
    weights = load_file(cfg.stage_dir("train") / "final" / "model" / "adapter_model.safetensors")
    assert all(t.shape == (16, 128) for n, t in weights.items() if "lora_A" in n)  # gathered from the shards
    assert (cfg.stage_dir("train") / "final" / "dcp" / ".metadata").is_file(), "sharded optimizer state for resume"
    traces = list((cfg.stage_dir("train") / "pretrain" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000


def test_ddp_full_finetune_trains_every_weight(tiny_run, tmp_path):
    from pipeline.train.stage import run_train

    cfg = derived_config(
        tiny_run,
        tmp_path,
        "train.strategy=ddp",
        "train.full_finetune=true",
        "train.lr=1e-3",
        "train.max_steps=15",
        "train.checkpoint_every=15",
    )
    m = run_train(cfg)
    losses = [h["loss"] for h in m["history"]]
    assert 6.0 < losses[0] < 8.0 and losses[-1] < losses[0] - 0.2, losses
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(cfg.stage_dir("train") / "final" / "model")
    base = AutoModelForCausalLM.from_pretrained(m["base_model"])
    assert not torch.equal(trained.model.layers[0].mlp.experts.down_proj, base.model.layers[0].mlp.experts.down_proj)
    # the router's logits were a training output: a saved config asking for them broke batched generation
    assert not trained.config.output_router_logits
    padded = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[0, 1, 1, 1, 1]] + [[1] * 5]),
    }
    assert trained.generate(**padded, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 8)
    # the local Ray has no state API, so Ray Train's placement-group cleaner could never act (fit.Trainer)
    started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "TrainController" in started and "PlacementGroupCleaner" not in started, started


def test_early_stopping_ends_a_run_whose_eval_loss_is_flat(tiny_run, tmp_path):
    """lr 1e-9: the eval loss cannot move; the best is the first eval (step 2), and 3 evals without
    improvement (steps 4, 6, 8) end the run long before max_steps."""
    from pipeline.train.stage import run_train

    cfg = derived_config(
        tiny_run,
        tmp_path,
        "train.lr=1e-9",
        "train.max_steps=60",
        "train.eval_every=2",
        "train.early_stopping_patience=3",
        "train.early_stopping_min_delta=1e-4",
    )
    m = run_train(cfg)
    assert m["steps"] == 8 and m["stopped_early"], m["history"]
    assert [h["step"] for h in m["history"] if "eval_loss" in h] == [2, 4, 6, 8]


def task_workers() -> set[int]:
    """The processes the local Ray runs plain tasks in (one CPU each, so several at once)."""
    import os

    import ray

    def pid() -> int:
        return os.getpid()

    return set(ray.get([ray.remote(num_cpus=1)(pid).remote() for _ in range(8)]))


def test_staged_pretrain_sft_dpo_each_from_the_previous_model(tiny_run, tmp_path):
    """SFT learns the responses; DPO on a small preference set raises the chosen-over-rejected margin
    against its reference (the SFT model: the DPO adapter switched off). The local Ray's idle task workers
    outlive the stages' training runs (runtime.workers_kept): each stage tokenizes in processes that have
    transformers imported and the tokenizer loaded."""
    from pipeline.train.stage import run_train

    prefs = tmp_path / "prefs.jsonl"
    lines = Path("data/preferences.jsonl").read_text().splitlines()
    prefs.write_text("".join(line + "\n" for line in lines if "[TASK] license-count" in json.loads(line)["prompt"]))
    stages = (
        f"train.stages=[{{kind: pretrain, max_steps: 10}}, {{kind: sft, data: data/instructions.jsonl, "
        f"max_steps: 10}}, {{kind: dpo, data: {prefs}, max_steps: 20, lr: 5.0e-3, beta: 0.5}}]"
    )
    cfg = derived_config(tiny_run, tmp_path, stages, "train.checkpoint_every=20")
    before = task_workers()
    m = run_train(cfg)
    assert task_workers() & before, "every task worker was replaced while the stages trained"
    assert [s["stage"] for s in m["stages"]] == ["pretrain", "sft", "dpo"]
    train = cfg.stage_dir("train")
    assert m["stages"][1]["base_model"] == str(train / "sft" / "base")  # pretrain merged into sft's base
    assert m["base_model"] == str(train / "dpo" / "base") and Path(m["adapter"]) == train / "final" / "model"
    sft = history(cfg, "sft")
    assert sft[-1]["loss"] < sft[0]["loss"] - 0.3, sft
    assert "previous_eval_loss" in sft[-1], "SFT measures forgetting of the pretraining data"
    dpo = history(cfg, "dpo")
    assert dpo[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4), "the policy starts equal to its reference"
    assert dpo[-1]["reward_margin"] > 0.5 and dpo[-1]["reward_accuracy"] > 0.7, dpo
    assert dpo[-1]["loss"] < 0.6
    assert (train / "loss.png").stat().st_size > 1000


def test_ewc_lowers_forgetting_of_the_first_task(tiny_run, tmp_path):
    """Task A (licence name from licence text), then task B (other instruction tasks), with and
    without EWC: forgetting is A's held-out loss after B minus after A."""
    from pipeline.train.stage import run_train

    records = [json.loads(line) for line in Path("data/instructions.jsonl").read_text().splitlines()]
    for name, tasks in (("a", {"license"}), ("b", {"copyright-holder", "license-count", "upstream-name"})):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["task"] in tasks))
    stages = (
        f"train.stages=[{{kind: sft, name: task_a, data: {tmp_path}/a.jsonl, max_steps: 15}}, "
        f"{{kind: sft, name: task_b, data: {tmp_path}/b.jsonl, max_steps: 15, lr: 1.0e-3}}]"
    )
    forgetting = {}
    for ewc in (False, True):
        cfg = derived_config(
            tiny_run,
            tmp_path / f"ewc-{ewc}",
            stages,
            "train.full_finetune=true",
            "train.eval_every=5",
            f"train.ewc.enabled={ewc}",
            "train.ewc.weight=10",
        )
        m = run_train(cfg)
        after_a, after_b = m["stages"][0]["eval_loss_last"], m["stages"][1]["previous_eval_loss_last"]
        forgetting[ewc] = after_b - after_a
    print(f"\nFIGURE forgetting of task A (its held-out loss after B minus after A): {forgetting}")
    assert forgetting[False] > 0.2, forgetting  # B really does erase A without EWC (measured 0.48-0.75)
    assert forgetting[True] < forgetting[False] / 2, forgetting


def test_rope_scaling_extends_the_context_of_a_built_or_given_model(tiny_run, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.config import ModelConfig
    from pipeline.model import prepare_base_model

    kept = tiny_run.stage_dir("curate") / "kept"
    rope = {"rope_type": "yarn", "factor": 4.0}
    built = prepare_base_model(
        ModelConfig(preset="tiny-dense", vocab_size=512, tokenizer_docs=50, rope_scaling=rope), kept, tmp_path / "built"
    )
    given = prepare_base_model(
        ModelConfig(path=str(built), rope_scaling={"rope_type": "linear", "factor": 2.0}), kept, tmp_path / "given"
    )
    assert AutoConfig.from_pretrained(built).rope_parameters["rope_type"] == "yarn"
    config = AutoConfig.from_pretrained(given)
    assert config.rope_parameters["rope_type"] == "linear" and config.max_position_embeddings == 2 * 8192
    assert (given / "model.safetensors").is_symlink(), "the user's weights are linked, not copied"
    model = AutoModelForCausalLM.from_pretrained(given)
    assert model(torch.randint(0, 500, (1, 4096))).logits.shape == (1, 4096, config.vocab_size)


def dense_model(tokenizer_dir: Path, out: Path) -> int:
    """A 4.5M-parameter dense Qwen3, initialised wide so that its loss depends on every
    weight arriving intact. Returns the whole model's bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=len(tokenizer),
            num_key_value_heads=4,
            head_dim=64,
            tie_word_embeddings=False,
            initializer_range=0.2,
            **shape,
        )
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_sharded_strategies_load_without_a_whole_model_on_every_worker(tiny_run, tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the model as transformers builds it (deepspeed.zero.Init) and rank 0 streams the
    checkpoint into the partitions module by module: right after loading, before DeepSpeed wraps it, each of
    the 2 workers holds half the parameters. FSDP2: every worker builds on the meta device, rank 0 alone
    reads the weights, a decoder layer at a time, and each worker receives its shards.
    Both start from the same loss, to the last digit: every weight arrived. With bf16, FSDP2 and DDP hold
    the frozen base in 16 bits. (ZeRO-2 keeps a whole replica per worker by design. How much memory
    loading took is in the metrics too; on a CPU it is an upper bound, see train/memory.py, so it is not
    asserted here.)"""
    from pipeline.train.stage import run_train

    whole = dense_model(tiny_model_dir, tmp_path / "dense")
    first = {}
    for name, overrides in {
        "zero3": ["train.zero_stage=3"],
        "fsdp": ["train.strategy=fsdp"],
        "fsdp_bf16": ["train.strategy=fsdp", "train.precision=bf16"],
        "ddp_bf16": ["train.strategy=ddp", "train.zero_stage=null", "train.precision=bf16"],
    }.items():
        cfg = derived_config(
            tiny_run,
            tmp_path / name,
            f"model.path={tmp_path / 'dense'}",
            "train.lora.modules_to_save=[]",
            "train.batch_size=1",
            "train.max_steps=1",
            "train.checkpoint_every=1",
            *overrides,
        )
        first[name] = run_train(cfg)["history"][0]
    with_lora = first["fsdp"]["params_whole_gib"]
    assert whole / 2**30 < with_lora < 1.05 * whole / 2**30  # the base and its LoRA adapters
    for name in ("zero3", "fsdp", "fsdp_bf16"):  # the dense base's checkpoint went to the shards a module at a time
        assert first[name]["weights_streamed"], first[name]
    assert all(0 < run["load_seconds"] < 600 for run in first.values()), first
    assert not first["ddp_bf16"]["weights_streamed"]  # a whole replica on each worker: from_pretrained
    for name in ("zero3", "fsdp"):
        assert first[name]["params_whole_gib"] == with_lora, first[name]
        assert first[name]["params_held_gib"] == pytest.approx([with_lora / 2] * 2, rel=0.02), first[name]
    # mixed precision: the frozen base in bf16, half the bytes; the LoRA adapters (trainable) stay fp32
    assert first["fsdp_bf16"]["params_held_gib"] == pytest.approx([with_lora / 4] * 2, rel=0.1), first["fsdp_bf16"]
    assert first["ddp_bf16"]["params_held_gib"] == pytest.approx([with_lora / 2] * 2, rel=0.1), first["ddp_bf16"]
    for name in ("fsdp_bf16", "ddp_bf16"):
        assert first[name]["loss"] == pytest.approx(first["fsdp"]["loss"], rel=0.02), name
    assert first["zero3"]["loss"] == pytest.approx(first["fsdp"]["loss"], rel=2e-4)


def test_a_sharded_full_finetune_saves_layer_by_layer_in_the_checkpoints_own_format(tiny_run, tmp_path):
    """ZeRO-3 and FSDP2 write a fully fine-tuned model a layer at a time (train/sharded_save.py). At a
    learning rate too small to move a weight, what they write is the base itself: the same tensor names
    (one per MoE expert, as the base's checkpoint has them), the same values, the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.train.stage import run_train

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    for name, strategy in {"zero3": "train.zero_stage=3", "fsdp": "train.strategy=fsdp"}.items():
        cfg = derived_config(
            tiny_run,
            tmp_path / name,
            strategy,
            "train.full_finetune=true",
            "train.lr=1e-30",
            "train.max_steps=1",
            "train.checkpoint_every=1",
        )
        base = Path(run_train(cfg)["base_model"])
        saved = cfg.stage_dir("train") / "final" / "model"
        written, original = load_file(saved / "model.safetensors"), load_file(base / "model.safetensors")
        assert written.keys() == original.keys() and any(".experts.0." in k for k in written), name
        for key, tensor in original.items():
            assert torch.equal(written[key], tensor), (name, key)
        with torch.no_grad():
            logits = [AutoModelForCausalLM.from_pretrained(d)(ids).logits for d in (saved, base)]
        assert torch.equal(*logits), name
