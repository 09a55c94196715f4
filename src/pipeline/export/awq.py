"""AWQ 4-bit weight quantization with llm-compressor (the maintained home of AWQ).

Output is a compressed-tensors HF directory that transformers (CPU) and vLLM (GPU) load.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.config import ConfigError, QuantizeConfig
from pipeline.loading import load_model, load_model_config, load_tokenizer, model_from_config

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


def ignored(name: str, patterns: list[str]) -> bool:
    """llm-compressor's matching: a plain name matches the module's last part, 're:' a regex on its path."""
    return any(re.match(p[3:], name) if p.startswith("re:") else name.split(".")[-1] == p for p in patterns)


def group_size_problems(architecture, settings: QuantizeConfig) -> list[str]:
    """The quantized layers whose input width is no multiple of the group size, which AWQ cannot quantize:
    'name width' for each, from the model's config alone (no weights are read). MoE experts count as
    the Linear layers AWQ makes of them (linearize_moe): gate/up take hidden_size, down moe_intermediate_size."""
    with torch.device("meta"):
        model = model_from_config(AutoModelForCausalLM, architecture)
    widths = {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if getattr(architecture, "num_experts", 0):
        expert = "model.layers.0.mlp.experts.0"
        widths |= {
            f"{expert}.gate_proj": architecture.hidden_size,
            f"{expert}.up_proj": architecture.hidden_size,
            f"{expert}.down_proj": architecture.moe_intermediate_size,
        }
    patterns = IGNORE + settings.ignore
    return [
        f"{name} {width}"
        for name, width in widths.items()
        if width % settings.group_size and not ignored(name, patterns)
    ]


def quantize_awq(
    model_dir: Path, out: Path, calib_texts: list[str], settings: QuantizeConfig, trust_remote_code: bool
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
        num_bits=4,
        type="int",
        symmetric=settings.symmetric,
        strategy=QuantizationStrategy.GROUP,
        group_size=settings.group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    calib = Dataset.from_dict({"text": calib_texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=settings.calib_seq_len),
        batched=True,
        remove_columns=["text"],
    )
    oneshot(
        model=model,
        dataset=calib,
        recipe=[
            AWQModifier(ignore=IGNORE + settings.ignore, config_groups={"group_0": scheme}, n_grid=settings.grid_points)
        ],
        max_seq_length=settings.calib_seq_len,
        num_calibration_samples=len(calib_texts),
        output_dir=str(out),
        trust_remote_code_model=trust_remote_code,
    )
    tokenizer.save_pretrained(out)
    log.info("AWQ W4 g%d (%s) written to %s", settings.group_size, "sym" if settings.symmetric else "asym", out)
    return out
