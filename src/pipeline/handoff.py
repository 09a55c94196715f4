"""What one stage hands to the next: the files that say where each stage's output is. Every stage
reads its inputs through these functions, so the contract lives in one place.

curate    runs/<name>/curate/kept/                 curated Parquet shards
train     runs/<name>/train/metrics.json            "base_model" and "adapter": the trained model
quantize  runs/<name>/quantize/merged/              the 16-bit model (distillation's default teacher)
          runs/<name>/quantize/quant_report.json    "serve_model": the folder to serve, or null (gate failed)
distill   runs/<name>/distill/final/model/          the student
adapters  runs/<name>/adapters/<adapter>/          LoRA adapters served beside the model, a folder each
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import QualityGateError

TRAIN_METRICS = "metrics.json"
QUANT_REPORT = "quant_report.json"


def curated_dir(cfg: PipelineConfig) -> Path:
    kept = cfg.stage_dir("curate") / "kept"
    if not kept.is_dir():
        raise FileNotFoundError(f"no curated data at {kept}: run `pipeline curate` first")
    return kept


@dataclass(frozen=True)
class TrainedModel:
    """The train stage's result: `model` is a LoRA adapter for `base_model`, or (after a full
    fine-tune) a whole model."""

    base_model: Path
    model: Path

    @property
    def is_adapter(self) -> bool:
        return (self.model / "adapter_config.json").is_file()


def write_trained(cfg: PipelineConfig, trained: TrainedModel, summary: dict) -> dict:
    result = {"base_model": str(trained.base_model), "adapter": str(trained.model), **summary}
    (cfg.stage_dir("train") / TRAIN_METRICS).write_text(json.dumps(result, indent=2))
    return result


def trained_model(cfg: PipelineConfig) -> TrainedModel:
    path = cfg.stage_dir("train") / TRAIN_METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no trained model in {path.parent}: run `pipeline train` first")
    metrics = json.loads(path.read_text())
    return TrainedModel(Path(metrics["base_model"]), Path(metrics["adapter"]))


def model_folder(path: Path, what: str, how: str) -> Path:
    """`path` when a model is there; otherwise an error that says how to make it."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {path}: {how}")
    return path


def merged_model_dir(cfg: PipelineConfig) -> Path:
    return model_folder(cfg.stage_dir("quantize") / "merged", "merged model", "run `pipeline quantize` first")


def student_model_dir(cfg: PipelineConfig) -> Path:
    student = cfg.stage_dir("distill") / "final" / "model"
    return model_folder(student, "distilled student", "run `pipeline distill` first")


def stage_model_dir(cfg: PipelineConfig, stage: str) -> Path:
    """The model as one of train.stages left it: the next stage's base (a stage after another starts from
    the model so far, merged), or after the last stage the merged 16-bit model."""
    names = [spec.name for spec in cfg.train.stages]
    if stage not in names:
        raise FileNotFoundError(f"no training stage {stage!r}; train.stages has {', '.join(names)}")
    following = names[names.index(stage) + 1 :]
    if not following:
        return merged_model_dir(cfg)
    return model_folder(
        cfg.stage_dir("train") / following[0] / "base", f"model after stage {stage}", "run `pipeline train` first"
    )


def served_model_dir(cfg: PipelineConfig) -> Path:
    """The model the last quantize stage of this config says to serve."""
    path = cfg.stage_dir("quantize") / QUANT_REPORT
    if not path.is_file():
        raise FileNotFoundError(f"no exported model in {path.parent}: run `pipeline quantize` first")
    report = json.loads(path.read_text())
    if report["serve_model"] is None:
        raise QualityGateError(
            f"the 4-bit model in {path.parent} failed the quality gate "
            f"({report['gate']}); rerun `pipeline quantize --force` to serve it anyway"
        )
    return path.parent / report["serve_model"]


def adapters_dir(cfg: PipelineConfig) -> Path | None:
    """The folder of the run's LoRA adapters, served beside its model; None while it has none."""
    folder = cfg.stage_dir("adapters")
    return folder if folder.is_dir() else None
