"""`pipeline eval`: every model eval.models names, scored by lm-evaluation-harness on the same tasks, in
runs/<name>/eval/report.json and report.md, with eval.gate's verdicts (report.check_gate acts on them)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import lm_eval

from pipeline.config import PipelineConfig
from pipeline.eval.harness import EvalModel, eval_models, resolve, score_all, scored_names
from pipeline.eval.report import deltas, gate_verdicts, markdown, scores
from pipeline.eval.tasks import task_specs, write_shipped_data
from pipeline.loading import load_tokenizer

log = logging.getLogger("pipeline.eval")
REPORT = "report.json"


def _settings(cfg: PipelineConfig):
    """eval with `served` named as the model it is (merged or awq), as the report names it."""
    settings = cfg.eval

    def named(name: str | None) -> str | None:
        return resolve(cfg, name)[0].name if name == "served" else name

    gates = [g.model_copy(update={"model": named(g.model), "reference": named(g.reference)}) for g in settings.gate]
    # the endpoint reads windows of at most what it takes; every model reads the same ones, so that they compare
    window = settings.max_length or (cfg.serve.max_prompt_tokens - 1 if "endpoint" in scored_names(settings) else None)
    return settings.model_copy(update={"reference": named(settings.reference), "gate": gates, "max_length": window})


@contextmanager
def reachable(cfg: PipelineConfig, models: list[EvalModel]) -> Iterator[list[EvalModel]]:
    """The models, an endpoint with no eval.endpoint_url served here for the scoring and stopped after."""
    waiting = [m for m in models if m.name == "endpoint" and not m.url]
    if not waiting:
        yield models
        return
    from ray import serve

    from pipeline.serving.deploy import deploy

    url = deploy(cfg)
    try:
        yield [replace(m, url=url) if m in waiting else m for m in models]
    finally:
        serve.shutdown()


def run_eval(cfg: PipelineConfig) -> dict:
    """Score and write the report; its "gate" holds the verdicts, which the caller acts on (check_gate)."""
    start, out, trust = time.time(), cfg.stage_dir("eval"), cfg.model.trust_remote_code
    settings, models = _settings(cfg), eval_models(cfg)
    log.info("eval: %s on %s", ", ".join(m.name for m in models), ", ".join(settings.tasks))
    write_shipped_data(cfg, out / "data", load_tokenizer(models[0].path, trust))
    with reachable(cfg, models) as models:
        outputs = score_all(cfg, models, task_specs(cfg, out / "data"), settings)
    first = next(iter(outputs.values()))
    report = {
        "lm_eval_version": lm_eval.__version__,
        "settings": settings.model_dump(include={"limit", "num_fewshot", "batch_size", "tasks"}),
        "tasks": {
            task: {"version": version, "num_fewshot": first["n-shot"].get(task), "docs": first["n-samples"].get(task)}
            for task, version in first["versions"].items()
        },
        "reference": settings.reference,
        "models": {
            m.name: {
                "path": str(m.path),
                **({"url": m.url} if m.url else {}),
                "adapter": str(m.adapter) if m.adapter else None,
                "seconds": outputs[m.name]["seconds"],
                "scores": scores(outputs[m.name]),
            }
            for m in models
        },
    }
    report["deltas"] = deltas(report["models"], settings.reference)
    report["gate"] = gate_verdicts(report["models"], settings)
    report["wall_s"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    log.info("eval: report in %s (%.0f s)", out / REPORT, report["wall_s"])
    return report
