"""Base models: a local HF directory (`model.path`), or a tiny preset built from a config with
a BPE tokenizer trained on the curated text (no model hub is needed, or reachable)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from pipeline.config import ModelConfig
from pipeline.heldout import split_texts
from pipeline.loading import load_model_config, model_from_config

log = logging.getLogger("pipeline.model")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)

# Widths are multiples of 128 so that every Linear layer holds whole AWQ groups of 128.
_COMMON = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
}
PRESETS = {
    "tiny-moe": lambda vocab: Qwen3MoeConfig(
        vocab_size=vocab,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.01,
        **_COMMON,
    ),
    "tiny-dense": lambda vocab: Qwen3Config(vocab_size=vocab, intermediate_size=256, **_COMMON),
    # The demo's model: big enough that its Linear layers, not the 16-bit embeddings, hold most
    # of the bytes, so 4-bit AWQ brings it under 0.3x its 16-bit size (~21M parameters).
    "small-moe": lambda vocab: Qwen3MoeConfig(
        vocab_size=vocab,
        intermediate_size=512,
        moe_intermediate_size=768,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        router_aux_loss_coef=0.01,
        **{**_COMMON, "hidden_size": 256, "num_hidden_layers": 4, "head_dim": 64},
    ),
    # The scale targets (7B on one GPU, 66B on eight), random-init: shapes for capacity planning and GPU benchmarks.
    "7b-dense": lambda vocab: Qwen2Config(  # Qwen2-7B's shape
        vocab_size=vocab,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    ),
    "66b-dense": lambda vocab: LlamaConfig(  # LLaMA-65B's shape
        vocab_size=vocab,
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    ),
}
# What each preset needs to train (the configs named here hold the matching train settings).
HARDWARE = {
    "tiny-moe": "any CPU (tests: configs/tiny.yaml)",
    "tiny-dense": "any CPU",
    "small-moe": "2 CPU cores, ~2 GB (the demo: configs/demo.yaml)",
    "7b-dense": "one 80 GB GPU with LoRA, bf16, gradient checkpointing (configs/7b-lora.yaml)",
    "66b-dense": "8 x 80 GB GPUs, DeepSpeed ZeRO-3 with optimizer offload, LoRA (configs/66b-zero3.yaml)",
}


def apply_rope_scaling(config, rope: dict | None):
    """Extend the context: transformers reads `rope_parameters`; the positions grow by `factor`."""
    if not rope:
        return config
    original = config.max_position_embeddings
    config.rope_parameters = {**(config.rope_parameters or {}), "original_max_position_embeddings": original, **rope}
    config.max_position_embeddings = int(original * float(rope.get("factor", 1.0)))
    return config


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )


def check_model_dir(path: str | Path, trust_remote_code: bool) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path} is not a Hugging Face model directory (no config.json)")
    load_model_config(path, trust_remote_code)  # fails early on a config transformers cannot read
    return path


def rescaled_copy(model_dir: Path, rope: dict, out: Path, trust_remote_code: bool) -> Path:
    """The user's model with RoPE scaling, without copying its weights: links to its files and a new config."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    apply_rope_scaling(load_model_config(model_dir, trust_remote_code), rope).save_pretrained(out)
    return out


def prepare_base_model(model_config: ModelConfig, corpus_kept: Path | None, out: Path) -> Path:
    """Return the directory of the base model to fine-tune, building the preset if needed (its tokenizer
    trains on the curated corpus; the same corpus gives the same model, so a rerun can resume)."""
    if model_config.path:
        path = check_model_dir(model_config.path, model_config.trust_remote_code)
        if not model_config.rope_scaling:
            return path
        return rescaled_copy(path, model_config.rope_scaling, out, model_config.trust_remote_code)
    if corpus_kept is None:
        raise FileNotFoundError(
            "a preset base model trains its tokenizer on the curated corpus: run `pipeline "
            "curate` first, or set model.path to a model directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    texts = split_texts(corpus_kept, model_config.tokenizer_docs, held_out=False)
    tokenizer = train_tokenizer(texts, model_config.vocab_size)
    architecture = apply_rope_scaling(PRESETS[model_config.preset](len(tokenizer)), model_config.rope_scaling)
    torch.manual_seed(0)
    model = model_from_config(AutoModelForCausalLM, architecture)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "built %s base model (%.2fM parameters, vocab %d) in %s", model_config.preset, n / 1e6, len(tokenizer), out
    )
    return out
