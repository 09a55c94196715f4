"""The memory plan (`pipeline plan`): its model-state arithmetic agrees with DeepSpeed's own estimators,
it gives the scale table's three verdicts, and `pipeline train` refuses a plan that cannot fit."""

import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from conftest import REPO, free_port
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.model import PRESETS
from pipeline.plan import GB, count_shape, make_plan, model_states, report
from pipeline.preflight import check_memory


def plan_of(config: str, *overrides: str):
    cfg = load_config(REPO / config, list(overrides))
    return make_plan(cfg, PRESETS[cfg.model.preset](cfg.model.vocab_size))


@pytest.mark.parametrize("workers", [1, 2, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_full_finetune_model_states_match_deepspeeds_estimators(workers, offload):
    architecture = PRESETS["tiny-moe"](512)
    total, largest = model_to_params(AutoModelForCausalLM.from_config(architecture))
    shape = count_shape(architecture)
    assert (shape.total, shape.largest_layer, shape.trainable) == (total, largest, total)
    for stage in (2, 3):
        cfg = load_config(
            REPO / "configs/tiny.yaml",
            ["train.use_gpu=true", "train.full_finetune=true", f"train.zero_stage={stage}"]
            + ["train.offload_optimizer=true"] * offload,
        )
        ours = model_states(shape, cfg.train, workers)
        on_gpu = ours["params"] + ours["grads"] + ours["optimizer"] + ours["buffers"]
        if stage == 3:
            _, expected, _ = estimate_zero3_model_states_mem_needs(
                total, largest, num_gpus_per_node=workers, cpu_offload=offload, cpu_offload_params=False
            )
        else:
            _, expected = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=workers, cpu_offload=offload)
        assert abs(on_gpu - expected) <= 3, (stage, offload, on_gpu, expected)  # int() of each part


def test_lora_counts_what_peft_trains():
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"])
    architecture = PRESETS["tiny-moe"](512)
    model = get_peft_model(AutoModelForCausalLM.from_config(architecture), cfg.train.lora.peft_config())
    shape = count_shape(architecture, cfg.train.lora.peft_config())
    assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.total == sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)


def test_the_scale_tables_three_verdicts():
    big = plan_of("configs/66b-zero3.yaml")
    assert big.fits and big.stages[0].planned_micro_batch >= 1
    # ZeRO-2 keeps all 65B bf16 weights (130 GB) on every GPU
    replicated = plan_of("configs/66b-zero3.yaml", "train.zero_stage=2")
    assert not replicated.fits and replicated.stages[0].largest_micro_batch == 0
    assert replicated.stages[0].memory.params > 80 * GB
    seven = plan_of("configs/7b-lora.yaml")
    assert seven.fits and [s.stage for s in seven.stages] == ["pretrain", "sft", "dpo"]
    # DPO runs chosen and rejected together: half the micro-batch of SFT
    assert seven.stages[2].largest_micro_batch == seven.stages[1].largest_micro_batch // 2
    assert big.serving.fits and seven.serving.fits


def test_largest_micro_batch_is_the_edge_of_the_capacity():
    stage = plan_of("configs/7b-lora.yaml", "train.batch_size=4").stages[0]
    b, memory = stage.largest_micro_batch, stage.memory
    assert memory.total(b) <= stage.capacity < memory.total(b + 1)
    assert stage.planned_micro_batch == 4 and stage.total == memory.total(4)


def test_what_each_switch_saves():
    base = plan_of("configs/7b-lora.yaml", "train.gradient_checkpointing=false").stages[0].memory
    checkpointed = plan_of("configs/7b-lora.yaml").stages[0].memory
    fused = plan_of("configs/7b-lora.yaml", "train.fused_cross_entropy=true").stages[0].memory
    sharded = plan_of("configs/7b-lora.yaml", "train.zero_stage=3", "train.num_workers=4").stages[0].memory
    assert checkpointed.activations_per_sample < base.activations_per_sample / 5
    assert fused.logits_per_sample == 0 < checkpointed.logits_per_sample
    assert sharded.params < checkpointed.params / 3
    awq, bf16 = (
        plan_of("configs/7b-lora.yaml").serving,
        plan_of("configs/7b-lora.yaml", "quantize.enabled=false").serving,
    )
    assert awq.weights < 0.4 * bf16.weights and awq.concurrent_sequences >= bf16.concurrent_sequences


def test_train_refuses_a_plan_that_cannot_fit_unless_forced(capsys):
    cfg = load_config(REPO / "configs/66b-zero3.yaml", ["train.zero_stage=2"])
    architecture = PRESETS[cfg.model.preset](cfg.model.vocab_size)
    with pytest.raises(ConfigError, match=r"pretrain does not fit.*--force-memory"):
        check_memory(cfg, architecture, force=False)
    check_memory(cfg, architecture, force=True)
    assert "pretrain does NOT fit" in capsys.readouterr().out


def test_pipeline_plan_prints_json_and_a_report(capsys):
    assert main(["plan", "--config", str(REPO / "configs/66b-zero3.yaml"), "train.zero_stage=2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["stages"][0]["gb"]["params"] > 80
    assert main(["plan", "--config", str(REPO / "configs/7b-lora.yaml")]) == 0
    assert "memory plan (ZeRO-2, 1 worker): pretrain fits" in capsys.readouterr().out


def test_cluster_docs_quote_the_planners_numbers():
    """docs/cluster.md's sizing section is `pipeline plan`'s output for the two GPU configs, pasted:
    when the arithmetic changes, this fails until the docs are regenerated."""
    docs = (REPO / "docs/cluster.md").read_text()
    for config in ("configs/7b-lora.yaml", "configs/66b-zero3.yaml"):
        assert report(plan_of(config)) in docs, f"regenerate docs/cluster.md: pipeline plan --config {config}"


def test_the_plan_counts_the_master_copy_and_the_reduce_bucket_deepspeed_allocates(monkeypatch):
    """What DeepSpeed's estimators leave out, read from a real engine: ZeRO-2 and ZeRO-3 clone the weights into
    an fp32 master partition even when they train in fp32, and reduce gradients through a bucket of
    `reduce_bucket_size` elements (a GPU allocates it whole); ZeRO-3 keeps at most the live parameters we set
    gathered."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.plan import REDUCE_BUCKET, ZERO3_LIVE_PARAMETERS, reduce_bucket
    from pipeline.train.strategy import deepspeed_config

    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for stage in (2, 3):
            train = load_config(
                REPO / "configs/tiny.yaml", [f"train.zero_stage={stage}", "train.full_finetune=true"]
            ).train
            model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
            engine, optimizer, _, _ = deepspeed.initialize(model=model, config=deepspeed_config(train, micro_batch=1))
            if stage == 2:
                master, weights = optimizer.single_partition_of_fp32_groups[0], optimizer.bit16_groups_flat[0]
            else:
                master, weights = optimizer.fp32_partitioned_groups_flat[0], optimizer.fp16_partitioned_groups_flat[0]
            assert master.data_ptr() != weights.data_ptr() and torch.equal(master, weights), stage
            assert optimizer.reduce_bucket_size == REDUCE_BUCKET
            zero = engine._config.zero_config
            assert stage == 2 or zero.max_live_parameters == zero.max_reuse_distance == ZERO3_LIVE_PARAMETERS
            shape = count_shape(PRESETS["tiny-dense"](512))
            optim_bytes = model_states(shape, train, workers=1)["optimizer"]
            assert optim_bytes == 12 * shape.total
            assert reduce_bucket(shape, train) == 4 * min(shape.total, REDUCE_BUCKET)  # CPU: what gradients fill
            on_gpu = train.model_copy(update={"use_gpu": True, "precision": "bf16"})
            assert reduce_bucket(shape, on_gpu) == 2 * REDUCE_BUCKET
    finally:
        dist.destroy_process_group()
