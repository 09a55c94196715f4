"""Base models: a local HF directory (`model.path`), or a tiny preset built from a config with
a BPE tokenizer trained on the curated text (no model hub is needed, or reachable)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import pyarrow.dataset as pads
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3MoeConfig

from pipeline.config import ModelConfig

log = logging.getLogger("pipeline.model")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)

# Widths are multiples of 128 so that every Linear layer holds whole AWQ groups of 128.
_COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               head_dim=32, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
PRESETS = {
    "tiny-moe": lambda vocab: Qwen3MoeConfig(
        vocab_size=vocab, intermediate_size=256, moe_intermediate_size=128, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, router_aux_loss_coef=0.01, **_COMMON),
    "tiny-dense": lambda vocab: Qwen3Config(vocab_size=vocab, intermediate_size=256, **_COMMON),
    # The demo's model: big enough that its Linear layers, not the 16-bit embeddings, hold most
    # of the bytes, so 4-bit AWQ brings it under 0.3x its 16-bit size (~21M parameters).
    "small-moe": lambda vocab: Qwen3MoeConfig(
        vocab_size=vocab, intermediate_size=512, moe_intermediate_size=768, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, router_aux_loss_coef=0.01,
        **{**_COMMON, "hidden_size": 256, "num_hidden_layers": 4, "head_dim": 64}),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=2048)


def sample_texts(parquet_dir: Path, limit: int) -> Iterable[str]:
    """Stream up to `limit` texts from a curated Parquet folder without loading it whole."""
    seen = 0
    for batch in pads.dataset(str(parquet_dir), format="parquet").to_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if seen >= limit:
                return
            seen += 1
            yield text


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path} is not a Hugging Face model directory (no config.json)")
    AutoConfig.from_pretrained(path)  # fails early on a config transformers cannot read
    return path


def prepare_base_model(cfg: ModelConfig, corpus_kept: Path, out: Path) -> Path:
    """Return the directory of the base model to fine-tune, building the preset if needed."""
    if cfg.path:
        return check_model_dir(cfg.path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(sample_texts(corpus_kept, cfg.tokenizer_docs), cfg.vocab_size)
    model = AutoModelForCausalLM.from_config(PRESETS[cfg.preset](len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("built %s base model (%.2fM parameters, vocab %d) in %s", cfg.preset, n / 1e6, len(tokenizer), out)
    return out
