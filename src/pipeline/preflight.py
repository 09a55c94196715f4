"""Checks that run in the driver before Ray starts, in seconds: what can be known to be wrong from the
config, the paths, the model directory and the first records of each data file is said now, not
minutes later from inside a worker.

A command checks what it will read: curate its inputs; train the model (config, weights, tokenizer),
the LoRA targets and each stage's data; quantize the layer widths against the AWQ group size;
distill the teacher and student directories.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig
from pipeline.loading import load_model_config, load_tokenizer
from pipeline.model import PRESETS

DATA_RECORDS_CHECKED = 1000


def check(command: str, cfg: PipelineConfig, inputs: list[str] | None = None, force_memory: bool = False) -> None:
    if command in ("curate", "run"):
        check_curate_inputs(inputs or cfg.data.input)
    if command in ("train", "run"):
        architecture = check_training(cfg)
        check_memory(cfg, architecture, force_memory)
    if command in ("quantize", "run") and cfg.quantize.enabled:
        check_quantize(cfg)
    if command == "distill" or (command == "run" and cfg.distill.enabled):
        for key in ("teacher_path", "student_path"):
            if path := getattr(cfg.distill, key):
                check_model_dir(Path(path), f"distill.{key}", cfg.model.trust_remote_code)


def check_curate_inputs(patterns: list[str]) -> None:
    from pipeline.curate.read import expand_inputs, file_format

    try:
        for path in expand_inputs(patterns):
            file_format(path)
    except ValueError as e:
        raise ConfigError(f"data.input: {e}") from None


def check_model_dir(path: Path, key: str, trust_remote_code: bool):
    """The model directory's config (returned), weights and tokenizer, each loadable."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{key}: {path} has no *.safetensors weights (pickled .bin weights are not loaded)")
    architecture = load_model_config(path, trust_remote_code)
    fix = "save the model's tokenizer beside it (tokenizer.save_pretrained)"
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing or broken tokenizer
        raise ConfigError(f"{key}: the tokenizer in {path} does not load ({type(e).__name__}: {e}); {fix}") from None
    if len(tokenizer) < 2:  # transformers 5 makes an empty tokenizer of the model's type when it finds no files
        raise ConfigError(f"{key}: the tokenizer in {path} does not load (no vocabulary files there); {fix}")
    return architecture


class _NoChatTemplate:
    """The tokenizer the train stage will build for a preset: trained on the corpus, without a chat template."""

    chat_template = None


def base_architecture(cfg: PipelineConfig):
    """(architecture, tokenizer) of the model training starts from, without building or loading weights."""
    if cfg.model.path:
        path, trust = Path(cfg.model.path), cfg.model.trust_remote_code
        return check_model_dir(path, "model.path", trust), load_tokenizer(path, trust)
    return PRESETS[cfg.model.preset](cfg.model.vocab_size), _NoChatTemplate()


def check_training(cfg: PipelineConfig):
    """The base model (its architecture is returned), the LoRA targets and each stage's records."""
    from pipeline.train.formats import RecordError, check_file
    from pipeline.train.stage import check_lora_targets

    architecture, tokenizer = base_architecture(cfg)
    if not cfg.train.full_finetune:
        where = cfg.model.path or f"the {cfg.model.preset} preset"
        check_lora_targets(architecture, cfg.train.lora, where, cfg.model.trust_remote_code)
    for spec in cfg.train.stages:
        if spec.kind == "pretrain":
            continue
        if not Path(spec.data).is_file():
            raise ConfigError(f"train.stages[{spec.name}].data: {spec.data} not found")
        try:
            check_file(spec.data, spec.kind, tokenizer, DATA_RECORDS_CHECKED)
        except RecordError as e:
            raise ConfigError(f"train.stages[{spec.name}].data: {e}") from None
    return architecture


def check_memory(cfg: PipelineConfig, architecture, force: bool) -> None:
    """Print the memory plan's verdict; refuse a stage that cannot fit unless forced."""
    from pipeline.plan import make_plan

    plan = make_plan(cfg, architecture)
    print(plan.verdict(), flush=True)
    short = [s for s in plan.stages if not s.fits]
    if short and not force:
        raise ConfigError(
            f"the memory plan says {', '.join(s.stage for s in short)} does not fit: {short[0].line()}. Lower "
            "model.seq_len or train.batch_size, turn on train.gradient_checkpointing or train.fused_cross_entropy, "
            "shard with train.zero_stage=3 or train.strategy=fsdp, add workers or train.offload_optimizer "
            "(see `pipeline plan`), or start anyway with --force-memory"
        )


def check_quantize(cfg: PipelineConfig) -> None:
    from pipeline.export.awq import group_size_problems

    architecture, _ = base_architecture(cfg)
    problems = group_size_problems(architecture, cfg.quantize)
    if problems:
        layers = sorted({name.split(" ")[0].rsplit(".", 1)[-1] for name in problems})
        raise ConfigError(
            f"quantize.group_size={cfg.quantize.group_size} needs every quantized layer's input width to be a "
            f"multiple of it; {len(problems)} are not ({', '.join(problems[:3])}{', ...' if len(problems) > 3 else ''}"
            f"). Keep them 16-bit with quantize.ignore=[{', '.join(f're:.*{name}$' for name in layers)}], or "
            "choose a group size that divides their widths"
        )
