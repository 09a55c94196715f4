"""The training speed switches against the plain path, on CPU and without Ray: each must leave the loss
(and its gradients) what the plain forward gives, within floating-point tolerance."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.train import fused_loss
from pipeline.train.data import IGNORE, document_positions


def lora_model(model_dir, **lora):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.config.output_router_logits = True  # the MoE balancing loss is part of the loss, as in training
    model = base if not lora else get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    for p in model.parameters():  # a trained-looking adapter: LoRA's B starts at zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model


def loss_and_grads(model, **batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "lora", [{}, {"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}], ids=["full", "lora"]
)
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients(tiny_model_dir, lora):
    ids = torch.randint(4, 500, (2, 48))
    labels = ids.clone()
    labels[0, :20] = IGNORE  # an SFT prompt: not learned
    plain = lora_model(tiny_model_dir, **lora)
    expected, expected_grads = loss_and_grads(plain, input_ids=ids, labels=labels)
    fused = lora_model(tiny_model_dir, **lora)
    assert fused_loss.install(fused, torch.device("cpu")) == "chunked"
    original_chunk = fused_loss.CHUNK_TOKENS
    fused_loss.CHUNK_TOKENS = 16  # several chunks in this small batch
    try:
        got, grads = loss_and_grads(fused, input_ids=ids, labels=labels)
    finally:
        fused_loss.CHUNK_TOKENS = original_chunk
    assert got == pytest.approx(expected, rel=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused(input_ids=ids).logits.shape == (2, 48, plain.config.vocab_size), "without labels: logits as before"


def test_chunked_cross_entropy_reads_no_full_logits(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    fused_loss.install(model, torch.device("cpu"))
    out = model(input_ids=torch.randint(4, 500, (2, 32)), labels=torch.randint(4, 500, (2, 32)))
    assert out.logits.shape[1] == 0 and out.loss.requires_grad


def dense_model(tmp_path, **config):
    from transformers import Qwen3Config

    torch.manual_seed(0)
    # weights large enough (initializer_range) that attention to other tokens changes the outputs
    AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=128,
            initializer_range=0.2,
            **config,
        )
    ).save_pretrained(tmp_path)
    return tmp_path


def test_packed_sequences_do_not_attend_to_each_other_in_training(tmp_path):
    """The training objective on a row of two packed documents (position ids restarting at the second)
    scores the second exactly as alone; padding_free pretraining rows and SFT rows rely on this."""
    from pipeline.train.objectives import causal_lm

    eos = 2
    first, second = torch.randint(4, 500, (12,)).tolist() + [eos], torch.randint(4, 500, (9,)).tolist() + [eos]
    row = torch.tensor([first + second])
    labels = torch.tensor([[IGNORE] * (len(first) + 1) + second[1:]])  # learn the second document only
    positions = torch.from_numpy(document_positions(row.numpy(), eos))
    model = AutoModelForCausalLM.from_pretrained(dense_model(tmp_path)).train()
    alone = causal_lm(model, {"input_ids": torch.tensor([second])})[0]
    packed = causal_lm(model, {"input_ids": row, "labels": labels, "position_ids": positions})[0]
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    crossing = causal_lm(model, {"input_ids": row, "labels": labels})[0]
    assert abs(crossing.item() - alone.item()) > 1e-2, "without restarts the second document sees the first"


def test_document_positions_restart_after_each_eos_and_at_each_row():
    ids = np.array([[5, 6, 2, 7, 8, 9, 2, 4], [1, 2, 3, 2, 2, 6, 7, 8]])
    assert document_positions(ids, 2).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 0, 0, 1, 2]]


def test_compiled_decoder_layers_give_the_plain_loss(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.train.recipe import build_model
    from pipeline.train.recipe_config import RecipeConfig

    model_dir = dense_model(tmp_path)
    ids = torch.randint(0, 512, (2, 32))
    losses = {}
    for compiled in (False, True):
        recipe = RecipeConfig(
            base_model=str(model_dir), train=TrainConfig(compile=compiled, full_finetune=True), model={"seq_len": 32}
        )
        model = build_model(recipe).model
        losses[compiled] = loss_and_grads(model, input_ids=ids, labels=ids)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)
    for name, grad in losses[True][1].items():
        torch.testing.assert_close(grad, losses[False][1][name], rtol=1e-3, atol=1e-5, msg=name)
