"""What a Ray Train worker needs for one training run, as one frozen, typed object.

Built in one place (`recipe_config`) from the typed PipelineConfig. A stage, or distillation, changes
it only through `model_copy(update=...)` of named fields. Workers read the names the YAML uses:
`config.train.lr` is `train.lr` (with the stage's own `lr` already applied).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.config import DistillConfig, LoraSettings, ModelConfig, PipelineConfig, StageSpec, TrainConfig


class RecipeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str  # the HF directory this run starts from
    train: TrainConfig  # the train section, with this stage's lr and max_steps
    model: ModelConfig  # seq_len and trust_remote_code are what a worker reads
    objective: Literal["causal_lm", "dpo", "distill"] = "causal_lm"
    dpo_beta: float = 0.1
    distill: DistillConfig | None = None  # alpha and temperature, with objective=distill
    teacher: str | None = None  # the teacher's directory, with objective=distill
    ewc: bool = False  # pull this stage towards the previous stage's weights (train.ewc)
    track_previous: bool = False  # measure the loss on the previous stage's held-out data
    output_dir: str | None = None  # rank 0 writes tensorboard/ and profile/ here
    inputs: dict[str, str] = {}  # fingerprints of what the run reads (pipeline.digest): base model, data
    planned_micro_batch: int | None = None  # batch_size=auto on sharded GPUs: the memory plan's (pipeline/plan.py)

    @property
    def lora(self) -> LoraSettings | None:
        """The adapter to train, or None for a full fine-tune."""
        return None if self.train.full_finetune else self.train.lora

    def digest(self) -> str:
        """Identity of the run for Ray Train's run name: everything that changes what is trained. Other
        stages' settings, where outputs go and the GPU size the memory plan assumed do not count."""
        settings = self.model_dump_json(exclude={"output_dir": True, "train": {"stages", "gpu_memory_gb"}})
        return hashlib.sha256(settings.encode()).hexdigest()[:10]


def recipe_config(cfg: PipelineConfig, base_model: Path, output_dir: Path) -> RecipeConfig:
    """The one place a RecipeConfig is built from the pipeline's config: plain language modelling on cfg.train."""
    return RecipeConfig(base_model=str(base_model), train=cfg.train, model=cfg.model, output_dir=str(output_dir))


def stage_recipe(
    cfg: PipelineConfig,
    spec: StageSpec,
    base_model: Path,
    output_dir: Path,
    first: bool,
    inputs: dict[str, str],
    planned_micro_batch: int | None = None,
) -> RecipeConfig:
    """One stage of train.stages: its objective, its own lr and max_steps where it sets them, and the
    fingerprints of what it reads (a `previous_data` entry: it measures forgetting of the stage before)."""
    train = cfg.train.model_copy(
        update={"lr": spec.lr or cfg.train.lr, "max_steps": spec.max_steps or cfg.train.max_steps}
    )
    return recipe_config(cfg, base_model, output_dir).model_copy(
        update={
            "train": train,
            "objective": "dpo" if spec.kind == "dpo" else "causal_lm",
            "dpo_beta": spec.beta,
            "ewc": cfg.train.ewc.enabled and not first,
            "track_previous": "previous_data" in inputs,
            "inputs": inputs,
            "planned_micro_batch": planned_micro_batch,
        }
    )
