"""The one typed config for the whole pipeline: YAML file + `key.sub=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and lists
what is allowed instead of being silently ignored.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config problem, worded for the user (the CLI prints it without a traceback)."""


def _absolute(path: str) -> str:
    """Paths are read where the command runs: Ray Train workers run in another directory, so a relative path
    is made absolute when the config loads (URIs stay as they are)."""
    return path if "://" in path else str(Path(path).expanduser().absolute())


LocalPath = Annotated[str, AfterValidator(_absolute)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DedupConfig(Section):
    exact: bool = Field(True, description="drop documents whose normalized text is identical")
    fuzzy: bool = Field(True, description="drop MinHash-LSH near-duplicates")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity that counts as duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash signature slots (one-permutation hashing bins)")
    ngram: int = Field(5, ge=1, le=32, description="word n-gram (shingle) size")
    survivors: Literal["greedy", "component"] = Field(
        "greedy",
        description="greedy: in id order, a document is kept unless a near duplicate of it is kept, so "
        "every removed document has a kept near duplicate; component: each group of chained near duplicates keeps "
        "its lowest id only (can remove documents that resemble no kept one)",
    )
    recall_weight: float = Field(
        0.98,
        gt=0,
        lt=1,
        description="LSH bands x rows favour recall this much "
        "(datasketch's weights=(1-w, w)); candidates are verified by exact Jaccard, "
        "so a higher weight costs only checks",
    )


class FiltersConfig(Section):
    """Quality filters (src/pipeline/curate/filters.py); 0 or [] turns one off."""

    min_words: int = Field(5, ge=0, description="drop documents with fewer words")
    max_words: int = Field(0, ge=0, description="drop documents with more words (0: no limit)")
    min_chars: int = Field(0, ge=0)
    max_chars: int = Field(0, ge=0, description="0: no limit")
    max_duplicate_line_chars: float = Field(0.3, ge=0, le=1, description="share of characters in repeated lines")
    max_top_ngram_share: float = Field(0.2, ge=0, le=1, description="share of the text the top word 3-gram covers")
    max_symbol_words: float = Field(0.1, ge=0, le=1, description="share of words without a letter or digit")
    min_alpha_words: float = Field(0.5, ge=0, le=1, description="share of words with a letter")
    scripts: list[str] = Field(default_factory=list, description="e.g. [latin]; [] keeps every script")
    min_script_share: float = Field(0.5, ge=0, le=1, description="share of letters in `scripts`")
    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(
        default_factory=list,
        description="ISO 639-1 codes to keep, e.g. [en, de] (curate/language.py labels each document's "
        "meta.language offline); [] keeps every language",
    )


class PerplexityConfig(Section):
    model_path: LocalPath | None = Field(None, description="local HF causal LM that scores documents; None: no filter")
    max_perplexity: float = Field(20, gt=0, description="keep documents whose perplexity is below this")
    max_tokens: int = Field(512, ge=8, description="tokens scored per document (its beginning)")
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1, description="scoring actors (each loads the model once; a GPU each when present)")


def template_fields(template: str) -> list[str]:
    """The names in braces of a str.format template ("" for a bare {}); raises ValueError on broken braces."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class TableConfig(Section):
    """How the rows of CSV/TSV files, and of Parquet files when `parquet` is set, become text
    (src/pipeline/curate/table.py)."""

    mode: Literal["row", "table"] = Field(
        "row", description="row: each row a document; table: each `rows_per_document` rows one markdown table"
    )
    template: str | None = Field(
        None,
        description='row mode: e.g. "{name} was born in {year}" (column names in braces); None writes '
        '"column: value" lines',
    )
    rows_per_document: int = Field(50, ge=1, description="table mode: rows per markdown table")
    parquet: bool = Field(
        False, description="read .parquet files as tables too (default: as records with data.text_field)"
    )

    @field_validator("template")
    @classmethod
    def _names_columns(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            names = template_fields(template)
        except ValueError as e:
            raise ValueError(
                f"data.table.template {template!r}: {e} (literal braces are written {{{{ and }}}})"
            ) from None
        if not names or "" in names or any(name.isdigit() for name in names):
            raise ValueError(f"data.table.template {template!r} must name columns in braces, e.g. {{name}}")
        return template


class ImageTextConfig(Section):
    """Image-text pairs (src/pipeline/curate/images.py): folders of images with sidecar captions are read as
    pairs always; jsonl/json/parquet records when `records` is set."""

    records: bool = Field(False, description="read jsonl/json/parquet records as LAION-style pairs")
    caption_field: str = "caption"
    url_field: str = "url"
    path_field: str = Field("path", description="a local image, relative to the record's file")
    template: Literal["caption", "instruction"] = Field(
        "caption",
        description="caption: the text is the caption; instruction: [TASK] image captioning [INPUT] "
        "<image:REF> [OUTPUT] caption",
    )


class AugmentConfig(Section):
    """Off unless a model path is given (src/pipeline/curate/augment.py)."""

    back_translation_models: list[LocalPath] = Field(
        default_factory=list, description="[forward, backward] local seq2seq dirs, e.g. opus-mt en-zh and zh-en"
    )
    back_translation_share: float = Field(0.1, ge=0, le=1, description="share of kept documents back-translated")
    synonym_model: LocalPath | None = Field(None, description="local fill-mask model dir for synonym perturbation")
    synonym_share: float = Field(0.1, ge=0, le=1, description="share of kept documents perturbed")
    synonym_word_share: float = Field(0.1, ge=0, le=1, description="share of a document's words replaced")
    max_tokens: int = Field(256, ge=8, description="tokens translated per document (its beginning)")
    concurrency: int = Field(1, ge=1, description="actors per augmentation model")

    @model_validator(mode="after")
    def _two_translation_models(self) -> AugmentConfig:
        if len(self.back_translation_models) not in (0, 2):
            raise ValueError("back_translation_models takes two paths: [forward, backward]")
        return self


class DataConfig(Section):
    input: list[str] = Field(
        default_factory=lambda: ["data/corpus/*.jsonl"],
        description="files, folders or globs: .jsonl/.json/.parquet/.txt/.html, WARC/WET crawls (.warc, .warc.gz, "
        ".wet.gz), MediaWiki dumps (.xml, .xml.bz2), tables (.csv, .tsv: see data.table), images with "
        "sidecar captions (see data.image_text); optionally .gz, .bz2 or .zst",
    )
    text_field: str = "text"
    id_field: str = "id"
    lowercase: bool = False
    keep_fields: list[str] = Field(
        default_factory=list,
        description="input fields carried into kept/ as `meta` (JSON); every other field is dropped",
    )
    rename: dict[str, str] = Field(default_factory=dict, description="new names for keep_fields inside `meta`")
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    table: TableConfig = Field(default_factory=TableConfig)
    image_text: ImageTextConfig = Field(default_factory=ImageTextConfig)
    shard_mb: float = Field(64, gt=0, description="target size of each kept/ Parquet shard (uncompressed text)")

    @model_validator(mode="before")
    @classmethod
    def _one_path_is_a_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("input"), str):
            values = {**values, "input": [values["input"]]}
        return values


PRESET_NAMES = Literal["tiny-moe", "tiny-dense", "small-moe", "7b-dense", "66b-dense"]


class ModelConfig(Section):
    path: LocalPath | None = Field(None, description="local HF causal-LM directory; None builds `preset`")
    preset: PRESET_NAMES = Field(
        "tiny-moe", description="random-init architecture (pipeline.model.PRESETS; HARDWARE there says what each needs)"
    )
    vocab_size: int = Field(2048, ge=256, description="BPE vocabulary when a tokenizer is trained")
    tokenizer_docs: int = Field(2000, ge=10, description="curated documents the tokenizer trains on")
    seq_len: int = Field(128, ge=16, description="training sequence length (tokens)")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped inside a model directory (auto_map); only for sources you trust"
    )
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="RoPE scaling for long context, e.g. {rope_type: yarn, factor: 4.0}; written into the "
        "base model's config (transformers' rope_parameters)",
    )


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="module names that get adapters"
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="modules trained in full beside the adapter, e.g. embed_tokens and "
        "lm_head when the base model was just built with a new tokenizer",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="LoRA on parameters rather than modules: MoE experts are fused 3-D "
        "parameters in transformers 5, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] (needs dropout 0)",
    )

    def peft_config(self):
        """peft's LoraConfig for these settings: what training builds and the memory plan counts."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules or None,
            target_parameters=self.target_parameters or None,
            modules_to_save=self.modules_to_save or None,
            task_type="CAUSAL_LM",
        )

    @model_validator(mode="after")
    def _parameter_lora_has_no_dropout(self) -> LoraSettings:
        if self.target_parameters and self.dropout:
            raise ValueError(
                f"peft's LoRA on parameters (target_parameters) does not support dropout: "
                f"set train.lora.dropout=0 (got {self.dropout})"
            )
        return self


class StageSpec(Section):
    """One stage of a staged run; each starts from the previous stage's model."""

    kind: Literal["pretrain", "sft", "dpo"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="output folder; default: kind")
    data: LocalPath | None = Field(
        None,
        description="sft: jsonl of {task, input, output} or {messages}; dpo: jsonl of "
        "{prompt, chosen, rejected}; pretrain reads the curated corpus",
    )
    max_steps: int | None = Field(None, ge=1, description="default: train.max_steps")
    lr: float | None = Field(None, gt=0, description="default: train.lr")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the KL constraint to the reference")
    where: dict[str, str] = Field(
        default_factory=dict,
        description="pretrain: only the curated documents whose fields match these globs; fields: id, source "
        "(the input file), or a key of meta (data.keep_fields), e.g. {customer: acme}",
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, values: Any) -> Any:
        values = {"kind": values} if isinstance(values, str) else values
        if isinstance(values, dict) and not values.get("name") and isinstance(values.get("kind"), str):
            values = {**values, "name": values["kind"]}
        return values

    @model_validator(mode="after")
    def _needs_data(self) -> StageSpec:
        if self.kind != "pretrain" and not self.data:
            raise ValueError(f"a {self.kind} stage needs `data`: a jsonl file")
        if self.kind != "pretrain" and self.where:
            raise ValueError(f"`where` picks curated documents for a pretrain stage; a {self.kind} stage reads `data`")
        return self


class EwcConfig(Section):
    """Elastic weight consolidation: a stage after the first is pulled towards the previous stage's
    weights, in proportion to how much they mattered (diagonal Fisher) on the previous stage's data."""

    enabled: bool = False
    weight: float = Field(
        10.0,
        gt=0,
        description="lambda; the Fisher is normalized to mean 1 over the trainable weights. "
        "Keep the penalty near the loss's size: Adam normalizes gradients, so a dominant penalty "
        "makes weights oscillate around their anchor instead of holding them",
    )
    fisher_batches: int = Field(8, ge=1, description="micro-batches of the previous stage's data per worker")


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = Field(False, description="a GPU per worker, NCCL; otherwise CPU workers and gloo")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="<1 leaves CPUs for Ray Data's feeding tasks on small machines"
    )
    strategy: Literal["deepspeed", "fsdp", "ddp"] = Field(
        "deepspeed", description="fsdp is PyTorch FSDP2 (sharded like ZeRO-3); ddp replicates the model on every worker"
    )
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage (strategy=deepspeed); default 2"
    )
    offload_optimizer: bool = Field(False, description="DeepSpeed: optimizer state in CPU memory (ZeRO 1-3)")
    deepspeed_config: LocalPath | None = Field(
        None, description="a DeepSpeed JSON whose keys override the generated ones"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPUs, fp32 on CPUs")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )
    fused_cross_entropy: bool = Field(
        False,
        description="compute the loss from hidden states without the full-vocabulary logits: Liger Kernel's "
        "fused linear cross-entropy on CUDA when installed, chunks of tokens elsewhere (train/fused_loss.py)",
    )
    compile: bool = Field(False, description="torch.compile each decoder layer (the first steps compile)")
    padding_free: bool = Field(
        False,
        description="pretraining: position ids restart at each document packed into "
        "a row, so documents do not attend to each other (as SFT examples never do)",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="attention kernel; auto: flash_attention_2 on GPUs where flash-attn is installed, "
        "else sdpa. The choice is logged and kept in the metrics",
    )
    gpu_memory_gb: float = Field(
        80, gt=0, description="memory of one GPU, which the memory plan (`pipeline plan`) checks each stage against"
    )
    lr: float = Field(3e-5, gt=0, description="peak learning rate (AdamW, cosine schedule after warmup)")
    warmup_steps: int = Field(5, ge=0, description="linear warmup steps")
    max_steps: int = Field(60, ge=1, description="optimizer steps per stage (a stage may set its own)")
    batch_size: int | Literal["auto"] = Field(
        8,
        description="micro-batch per worker; auto: memory / (seq_len x hidden x 4 bytes), halved on CUDA OOM "
        "(train/batch_size.py)",
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clipping")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="MoE load-balancing loss weight; None: the model's"
    )
    log_every: int = Field(5, ge=1, description="steps per logging window (metrics, TensorBoard)")
    eval_every: int = Field(10, ge=1, description="steps between eval-loss measurements on held-out data")
    eval_batches: int = Field(4, ge=1, description="held-out micro-batches per worker and evaluation")
    early_stopping_patience: int = Field(
        3, ge=0, description="stop after this many evals without improvement (0: never)"
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="an eval loss must drop this much to count")
    checkpoint_every: int = Field(20, ge=1, description="steps between checkpoints (a restart resumes there)")
    profile: bool = Field(False, description="PyTorch profiler traces of a few steps on rank 0 (<stage>/profile)")
    seed: int = Field(0, description="torch seed of every worker")
    checkpoint_uri: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints (path or s3://...): URI/checkpoints/<stage>; "
        "default: <stage folder>/ray",
    )
    inject_fault_at_step: int | None = Field(
        None, ge=1, description="fault drill: rank 0 raises once at this step; the run restarts from its checkpoint"
    )
    full_finetune: bool = Field(
        False, description="train every weight instead of LoRA adapters (train.lora is then unused)"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    stages: list[StageSpec] = Field(
        default_factory=lambda: [StageSpec(kind="pretrain")],
        description="e.g. [pretrain, {kind: sft, data: ...}, {kind: dpo, data: ...}]",
    )
    ewc: EwcConfig = Field(default_factory=EwcConfig)

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP split the weights themselves over the workers; the others keep a whole copy on each."""
        return self.strategy == "fsdp" or self.zero_stage == 3

    @property
    def resolved_precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """`auto` made concrete: bf16 on GPUs, fp32 on CPUs."""
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    @model_validator(mode="before")
    @classmethod
    def _zero_stage_default(cls, values: Any) -> Any:
        if (
            isinstance(values, dict)
            and values.get("strategy", "deepspeed") == "deepspeed"
            and values.get("zero_stage") is None
        ):
            values = {**values, "zero_stage": 2}
        return values

    @model_validator(mode="after")
    def _coherent(self) -> TrainConfig:
        if self.strategy != "deepspeed":
            for key in ("zero_stage", "deepspeed_config"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key} is a DeepSpeed setting but strategy={self.strategy}: "
                        + (
                            "DDP keeps a whole replica on every worker and cannot shard it; use "
                            "strategy=deepspeed (ZeRO) or strategy=fsdp to shard"
                            if self.strategy == "ddp"
                            else "FSDP shards like ZeRO-3 already; drop " + key
                        )
                    )
            if self.offload_optimizer:
                raise ValueError(f"offload_optimizer needs strategy=deepspeed (got {self.strategy})")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs GPUs (use_gpu=true); on CPUs use bf16 or fp32")
        if self.precision == "fp16" and self.strategy == "fsdp":
            raise ValueError("precision fp16 with strategy=fsdp is not supported here: use bf16")
        if self.compile and self.zero_stage == 3:
            raise ValueError(
                "compile with zero_stage 3 is not supported (ZeRO-3 gathers parameters in hooks inside "
                "the compiled layers): use strategy=fsdp to shard, or zero_stage <= 2"
            )
        if self.ewc.enabled and self.shards_parameters:
            raise ValueError("ewc needs whole parameters on every worker: use zero_stage <= 2 or strategy=ddp")
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"stages need distinct names (got {names}); give repeated kinds a `name`")
        return self


class QuantizeConfig(Section):
    enabled: bool = True
    method: Literal["awq"] = "awq"
    bits: Literal[4] = 4
    group_size: int = Field(128, ge=32, description="weights per quantization group")
    symmetric: bool = True
    ignore: list[str] = Field(
        default_factory=list,
        description="more layers kept in 16-bit, by name or 're:' regex (lm_head and MoE "
        "routers always are), e.g. [re:.*mlp.down_proj$] for widths that are no multiple of group_size",
    )
    calib_samples: int = Field(64, ge=1, description="documents AWQ calibrates on")
    calibration: Literal["auto", "corpus", "train_data"] = Field(
        "auto",
        description="what AWQ calibrates on and the gate scores: the curated corpus (its held-out split "
        "for the gate), or the run's own instruction/preference data; auto: the corpus when there is one",
    )
    calib_seq_len: int = Field(128, ge=16)
    grid_points: int = Field(
        20, ge=2, description="AWQ's search for each layer's scales tries this many; its time grows with it"
    )
    eval_samples: int = Field(32, ge=1, description="held-out documents the quality gate scores (it refuses fewer)")
    max_ppl_increase: float = Field(
        0.02, description="quality gate: fail when 4-bit perplexity exceeds 16-bit by more than this fraction"
    )


class DistillConfig(Section):
    enabled: bool = Field(False, description="`pipeline run` also distills a student after quantizing")
    teacher_path: LocalPath | None = Field(None, description="teacher HF dir; None = this run's merged 16-bit model")
    student_path: LocalPath | None = Field(None, description="student HF dir; it must use the teacher's tokenizer")
    student_preset: PRESET_NAMES = Field(
        "tiny-dense", description="built on the teacher's tokenizer when student_path is None"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-target KL; 1 - alpha weighs the CE")
    temperature: float = Field(2.0, gt=0, description="softens both distributions in the KL term")
    lr: float = Field(1e-3, gt=0, description="the student trains in full, from scratch or from student_path")
    max_steps: int = Field(60, ge=1, description="optimizer steps per stage (a stage may set its own)")
    eval_samples: int = Field(32, ge=1, description="held-out curated documents the KL to the teacher is measured on")


class ReplicaSettings(Section):
    """What every serving replica is built from; declared once, validators included. `serve.*` in the YAML
    extends it with where to listen (ServeConfig); the replicas get it with the model to serve (ServeArgs)."""

    engine: Literal["auto", "transformers", "vllm"] = "auto"
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2, gt=0, description="autoscaling aims at this many requests per replica")
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (vLLM is used when >0 and installed)")
    max_batch_size: int = Field(8, ge=1, description="requests per model.generate call (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="wait this long for requests to fill a batch")
    max_queue: int = Field(64, ge=1, description="requests a replica holds before answering 429")
    request_timeout_s: float = Field(120, gt=0, description="a request running longer gets 408")
    api_key_env: str = Field("PIPELINE_API_KEY", description="env var holding the API key; unset = no key")
    max_new_tokens: int = Field(256, ge=1, description="cap on tokens a request may ask for")
    max_prompt_tokens: int = Field(1024, ge=1)
    max_header_bytes: int = Field(32_768, ge=1024, description="requests whose headers are larger get 431")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="a request body over this is refused (413) before it is parsed"
    )
    max_loras: int = Field(
        8, ge=1, description="LoRA adapters a replica holds loaded at once (least recently used out)"
    )
    adapters_scan_s: float = Field(
        10,
        ge=0,
        description="look at the adapters folder again this often for changes; 0: only on POST /v1/adapters/reload",
    )
    max_lora_rank: int = Field(64, ge=1, description="vLLM: the largest LoRA rank among the adapters served")

    @model_validator(mode="after")
    def _replica_range(self) -> ReplicaSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self

    def replica_settings(self) -> dict:
        """This object's ReplicaSettings fields alone (a ServeConfig carries more)."""
        return self.model_dump(include=set(ReplicaSettings.model_fields))


class ServeConfig(ReplicaSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    demo_prompt: str | None = Field(
        None, description="what `pipeline run` asks the endpoint; default: a held-out prompt of the run's own data"
    )


class AdapterSpec(Section):
    """A LoRA adapter trained on the run's own model (its 16-bit export, quantize/merged) from its own data,
    and served beside that model under its name: one base, an adapter per customer, persona or task."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="its folder, and its model name at the endpoint")
    stages: list[StageSpec] = Field(
        ...,
        min_length=1,
        description="what it learns, in turn: e.g. [{kind: sft, data: FILE}, {kind: dpo, data: FILE}]; "
        "each stage goes on from the adapter so far",
    )
    lora: LoraSettings | None = Field(None, description="default: train.lora")

    @model_validator(mode="after")
    def _own_data(self) -> AdapterSpec:
        if any(stage.kind == "pretrain" and not stage.where for stage in self.stages):
            raise ValueError(
                f"adapter {self.name}: an adapter learns from its own data: stage kinds sft or dpo, or pretrain "
                "with `where` picking its part of the curated corpus"
            )
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter {self.name}: stages need distinct names (got {names}); give one a `name`")
        return self


_ONE = r"base|merged|awq|served|endpoint|student|(adapter|stage):[A-Za-z0-9_.-]+"
EVAL_MODEL, ONE_EVAL_MODEL = rf"^({_ONE}|adapters)$", rf"^({_ONE})$"  # `adapters` stands for several


class EvalGate(Section):
    """A model may score at most `max_drop` worse than the reference on one task's metric ("worse" as
    lm-eval says for the metric: lower accuracy, higher perplexity)."""

    model: str = Field(..., pattern=ONE_EVAL_MODEL, description="the model gated, e.g. awq or adapter:support")
    task: str = Field(..., description="a task of eval.tasks")
    metric: str = Field(..., description="one of the task's metrics, e.g. acc or word_perplexity")
    max_drop: float = Field(..., ge=0, description="in the metric's own units (0.02 = 2 points of accuracy)")
    reference: str | None = Field(None, pattern=ONE_EVAL_MODEL, description="default: eval.reference")


class EvalConfig(Section):
    """lm-evaluation-harness over the models the run made (`pipeline eval`; pipeline/eval/)."""

    models: list[Annotated[str, Field(pattern=EVAL_MODEL)]] = Field(
        ["merged", "served"],
        min_length=1,
        description="any of base (what training started from), stage:NAME (the model after that stage of "
        "train.stages), merged (16-bit), awq (4-bit), served (what `pipeline serve` serves), endpoint (the "
        "served model over HTTP, as users reach it), student (distilled), adapters (each of the run's "
        "adapters on the merged model), adapter:NAME",
    )
    endpoint_url: str | None = Field(
        None,
        description="the endpoint `endpoint` scores (e.g. a RayService's); default: `pipeline eval` serves the "
        "run's model for the scoring, as `pipeline serve` would, and stops it after",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="tokens per window of a long document (default: the model's; the endpoint's "
        "serve.max_prompt_tokens)",
    )
    tasks: list[str] = Field(
        ["heldout_text", "instruction_choice"],
        min_length=1,
        description="shipped offline tasks (heldout_text: held-out curated documents, perplexity; "
        "instruction_choice: held-out instructions as multiple choice, accuracy), tasks of eval.task_files, "
        "or any lm-eval task name whose data this machine can reach",
    )
    task_files: list[LocalPath] = Field(
        default_factory=list, description="your own lm-eval task YAMLs; data_files paths are read from their folder"
    )
    limit: int | None = Field(50, ge=1, description="documents per task (None: all)")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    reference: str = Field("merged", pattern=ONE_EVAL_MODEL, description="the model the report's deltas are against")
    gate: list[EvalGate] = Field(
        default_factory=list,
        description="e.g. [{model: awq, task: instruction_choice, "
        "metric: acc, max_drop: 0.02}]; a model over budget fails `pipeline eval` and `pipeline run`",
    )
    before_serving: bool = Field(False, description="`pipeline run` evaluates (and gates) before it serves")

    @model_validator(mode="after")
    def _gated_models_are_evaluated(self) -> EvalConfig:
        for gate in self.gate:
            if gate.task not in self.tasks:
                raise ValueError(f"eval.gate names task {gate.task!r}, which is not in eval.tasks {self.tasks}")
        return self


class PipelineConfig(Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="run name: outputs go to runs_dir/name/")
    runs_dir: str = Field("runs", description="local path, mount, or pyarrow.fs URI such as s3://bucket/runs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    adapters: list[AdapterSpec] = Field(
        default_factory=list, description="LoRA adapters on the run's model: `pipeline adapt`, and `pipeline run`"
    )
    adapters_at_once: int | None = Field(
        None,
        ge=1,
        description="adapters that train at the same time, each on its own worker group; default: as many "
        "as the cluster's CPUs and GPUs hold beside one CPU left for data tasks",
    )

    @model_validator(mode="after")
    def _adapter_names(self) -> PipelineConfig:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names) or self.name in names:
            raise ValueError(f"adapters need distinct names, none the run's own ({self.name!r}); got {names}")
        return self

    def adapter(self, name: str) -> AdapterSpec:
        for spec in self.adapters:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"no adapter {name!r} in this config; it has: {', '.join(a.name for a in self.adapters) or 'none'}"
        )

    def stage_dir(self, stage: str) -> Path:
        """A stage's local folder (a URI runs_dir is staged locally first: pipeline.storage)."""
        return Path(self.runs_dir).resolve() / self.name / stage


# short forms users type on the command line -> where the key lives
ALIASES = {"dedup.": "data.dedup."}


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, 1e-4, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, _, text = item.partition("=")
    for short, full in ALIASES.items():
        if key.startswith(short):
            key = full + key[len(short) :]
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is read as YAML and is not valid YAML ({problem}); "
            f"quote it as text: {key}='\"...\"'"
        ) from None


def key_lines(model: type[BaseModel], prefix: str) -> list[str]:
    """One line per settable key of a section, nested sections spelled out: `prefix.key = default  what`."""
    lines = []
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None and field.annotation is section:
            lines += key_lines(section, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        elif isinstance(default, list):
            default = [d.model_dump(exclude_defaults=True) if isinstance(d, BaseModel) else d for d in default]
        text = f"  {prefix}{name} = {default!r}"
        lines.append(f"{text:<48} {field.description}" if field.description else text)
    return lines


def keys_help(sections: list[str]) -> str:
    """The config keys of these sections (`pipeline <stage> --help`), from the typed config itself."""
    lines = ["config keys (set in the YAML or as key=value; defaults shown):"]
    for name in sections:
        section = _section_of(PipelineConfig.model_fields[name].annotation)
        lines += key_lines(section, f"{name}.") if section else key_lines_top(name)
    return "\n".join(lines)


def key_lines_top(name: str) -> list[str]:
    field = PipelineConfig.model_fields[name]
    return [f"{f'  {name} = {field.get_default(call_default_factory=True)!r}':<48} {field.description or ''}".rstrip()]


def _section_of(annotation) -> type[BaseModel] | None:
    """The config section a field holds: itself, or inside list[...], X | None and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _section_of(arg))), None)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: the list's section is already `model`
            continue
        field = model.model_fields.get(str(part))
        model = _section_of(getattr(field, "annotation", None))
        if model is None:
            return []
    return sorted(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(_allowed_keys(e['loc']))}")
        elif isinstance(e.get("input"), dict):  # a rule across a section's keys: the message names them
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None
