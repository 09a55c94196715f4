"""AWQ 4-bit weight quantization with llm-compressor (the maintained home of AWQ).

Output is a compressed-tensors HF directory that transformers (CPU) and vLLM (GPU) load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.config import ConfigError
from pipeline.loading import load_model, load_model_config, load_tokenizer

log = logging.getLogger("pipeline.quantize")

# lm_head and MoE routers stay in full precision: the router's argmax is fragile under 4 bits
IGNORE = ["lm_head", "re:.*mlp.gate$"]


def _allow_cpu_calibration() -> None:
    """llm-compressor 0.14 pins calibration activations for fast host->device copies and fails
    with "Cannot access accelerator device" when there is none; on CPU pinning buys nothing."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def check_supported(model_dir: str | Path, symmetric: bool, trust_remote_code: bool) -> None:
    """Fail before calibrating when the result could not be loaded back."""
    config = load_model_config(model_dir, trust_remote_code)
    if not symmetric and getattr(config, "num_experts", 0):
        # transformers 5.17 re-fuses the linearized experts on load and drops their zero points
        # ("Asymmetric quant requires zero-point values"), so the model would not reload
        raise ConfigError(
            "quantize.symmetric=false: asymmetric AWQ of MoE experts does not reload in "
            "transformers 5.17; use quantize.symmetric=true for MoE models"
        )


def quantize_awq(
    model_dir: Path,
    out: Path,
    calib_texts: list[str],
    group_size: int,
    symmetric: bool,
    seq_len: int,
    trust_remote_code: bool,
) -> Path:
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
    from compressed_tensors.quantization.quant_args import QuantizationArgs
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.awq import AWQModifier

    _allow_cpu_calibration()
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    # fused 3-D expert weights become per-expert Linear layers so that AWQ sees (and quantizes) them
    model = linearize_moe(load_model(AutoModelForCausalLM, model_dir, trust_remote_code, dtype="auto"))
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy=QuantizationStrategy.GROUP, group_size=group_size
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    calib = Dataset.from_dict({"text": calib_texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True, remove_columns=["text"]
    )
    oneshot(
        model=model,
        dataset=calib,
        recipe=[AWQModifier(ignore=IGNORE, config_groups={"group_0": scheme})],
        max_seq_length=seq_len,
        num_calibration_samples=len(calib_texts),
        output_dir=str(out),
        trust_remote_code_model=trust_remote_code,
    )
    tokenizer.save_pretrained(out)
    log.info("AWQ W4 g%d (%s) written to %s", group_size, "sym" if symmetric else "asym", out)
    return out
