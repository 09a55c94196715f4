"""Which stages are already done, so that `pipeline run` run again (a resubmitted job, a driver that was
killed) does not redo them.

A stage is done when its folder holds `done.json` with the digest of what it was run from: the config
sections it reads, the fingerprints of the files it reads (pipeline.digest) and the digest of the stage
before it, so that a changed corpus redoes curate and everything after it. The marker is written after
the stage's outputs: a stage killed halfway has none and runs again (training then resumes from its
last checkpoint). The single-stage commands write it too, so a `pipeline run` after them skips their work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.digest import path_digest

MARKER = "done.json"
ORDER = ("curate", "train", "quantize", "distill")
RESULT = {  # the file each stage leaves its summary in, which a skipped stage's result is read from
    "curate": "stats.json",
    "train": "metrics.json",
    "quantize": "quant_report.json",
    "distill": "metrics.json",
}


def _sections(cfg: PipelineConfig, stage: str) -> dict:
    section = {"curate": cfg.data, "train": cfg.model, "quantize": cfg.quantize, "distill": cfg.distill}[stage]
    settings = {stage: section.model_dump(mode="json")}
    if stage == "train":
        settings["train"] = cfg.train.model_dump(mode="json")
    return settings


def _inputs(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """Fingerprints of the files a stage reads besides the previous stage's outputs."""
    if stage == "curate":
        from pipeline.curate.read import expand_inputs

        local = [p for p in cfg.data.input if "://" not in p]
        try:
            return {f: path_digest(f) for f in expand_inputs(local)} if local else {}
        except FileNotFoundError:  # no corpus: a run on instruction data alone never curates
            return {}
    paths = []
    if stage == "train":
        paths = [cfg.model.path] + [spec.data for spec in cfg.train.stages]
    elif stage == "distill":
        paths = [cfg.distill.teacher_path, cfg.distill.student_path]
    return {str(p): path_digest(p) for p in paths if p and Path(p).exists()}


def stage_digest(cfg: PipelineConfig, stage: str) -> str:
    before = stage_digest(cfg, ORDER[ORDER.index(stage) - 1]) if stage != ORDER[0] else ""
    what = json.dumps([before, _sections(cfg, stage), _inputs(cfg, stage)], sort_keys=True, default=str)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def clear_done(cfg: PipelineConfig, stage: str) -> None:
    """Before a stage runs: until it ends, what its folder holds is not a finished stage's output."""
    (cfg.stage_dir(stage) / MARKER).unlink(missing_ok=True)


def mark_done(cfg: PipelineConfig, stage: str) -> None:
    (cfg.stage_dir(stage) / MARKER).write_text(json.dumps({"stage": stage, "digest": stage_digest(cfg, stage)}))


def finished(cfg: PipelineConfig, stage: str) -> dict | None:
    """The summary a finished stage left, if it is done with these settings and inputs; else None."""
    marker, result = cfg.stage_dir(stage) / MARKER, cfg.stage_dir(stage) / RESULT[stage]
    if not (marker.is_file() and result.is_file()):
        return None
    if json.loads(marker.read_text()).get("digest") != stage_digest(cfg, stage):
        return None
    return json.loads(result.read_text())
