"""lm-eval's output for every model in one report: each metric with its stderr, deltas against the
reference model, and the gate's verdicts (pure functions: tests build reports by hand)."""

from __future__ import annotations

from pipeline.config import EvalConfig
from pipeline.errors import QualityGateError


def scores(output: dict) -> dict[str, dict[str, dict]]:
    """task -> metric -> {value, stderr, higher_is_better} from one simple_evaluate output. lm-eval keys a
    metric `name,filter`; the filter is kept in the name only when there is one ('none' otherwise)."""
    table: dict[str, dict[str, dict]] = {}
    for task, metrics in output["results"].items():
        better = output["higher_is_better"].get(task, {})
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr"):
                continue
            label = name if filt == "none" else f"{name},{filt}"
            stderr = metrics.get(f"{name}_stderr,{filt}")
            table.setdefault(task, {})[label] = {
                "value": value,
                "stderr": stderr if isinstance(stderr, float) else None,  # lm-eval writes "N/A" when it has none
                "higher_is_better": better.get(name),
            }
    return table


def gate_verdicts(models: dict[str, dict], settings: EvalConfig) -> list[dict]:
    """Each eval.gate: the model's score, its reference's, how much worse ("drop", in the metric's units;
    worse is lower unless lm-eval says lower is better) and whether that is within max_drop."""
    verdicts = []
    for gate in settings.gate:
        reference = gate.reference or settings.reference
        try:
            mine = models[gate.model]["scores"][gate.task][gate.metric]
            theirs = models[reference]["scores"][gate.task][gate.metric]
        except KeyError:
            known = sorted(models[gate.model]["scores"].get(gate.task, {})) if gate.model in models else []
            raise QualityGateError(
                f"eval.gate: no {gate.metric} of {gate.model} and {reference} on {gate.task} "
                f"(its metrics: {', '.join(known) or 'none'})"
            ) from None
        drop = (
            theirs["value"] - mine["value"]
            if mine["higher_is_better"] is not False
            else mine["value"] - theirs["value"]
        )
        verdicts.append(
            {
                **gate.model_dump(exclude={"reference"}),
                "reference": reference,
                "value": mine["value"],
                "reference_value": theirs["value"],
                "drop": round(drop, 6),
                "passed": drop <= gate.max_drop,
            }
        )
    return verdicts


def check_gate(verdicts: list[dict]) -> None:
    failed = [v for v in verdicts if not v["passed"]]
    if failed:
        raise QualityGateError(
            "eval gate failed: "
            + "; ".join(
                f"{v['model']} scores {v['metric']} {v['value']:.4f} on {v['task']} against {v['reference']}'s "
                f"{v['reference_value']:.4f}, {v['drop']:.4f} worse, over max_drop {v['max_drop']}"
                for v in failed
            )
        )


def deltas(models: dict[str, dict], reference: str) -> dict[str, dict[str, dict[str, float]]]:
    """model -> task -> metric -> its value minus the reference model's (the reference itself left out)."""
    ref = models[reference]["scores"]
    return {
        name: {
            task: {
                m: round(s["value"] - ref[task][m]["value"], 6) for m, s in metrics.items() if m in ref.get(task, {})
            }
            for task, metrics in model["scores"].items()
        }
        for name, model in models.items()
        if name != reference
    }


def markdown(report: dict) -> str:
    """The report as a table: a row per model, task and metric; value ± stderr, and the delta."""
    reference = report["reference"]
    lines = [
        f"| model | task | metric | value ± stderr | vs {reference} |",
        "|---|---|---|---|---|",
    ]
    for name, model in report["models"].items():
        for task, metrics in model["scores"].items():
            for metric, s in metrics.items():
                spread = f" ± {s['stderr']:.4f}" if s["stderr"] is not None else ""
                delta = report["deltas"].get(name, {}).get(task, {}).get(metric)
                lines.append(
                    f"| {name} | {task} | {metric} | {s['value']:.4f}{spread} | "
                    f"{'' if delta is None else f'{delta:+.4f}'} |"
                )
    return "\n".join(lines) + "\n"
