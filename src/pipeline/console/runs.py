"""What the console shows, read from the run folders: each stage's status and wall time (journal and
result files), curate's stats and documents, training curves from TensorBoard, export and eval reports.
Pure reads: the console never writes into a run."""

from __future__ import annotations

import difflib
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import journal
from pipeline.eval.stage import REPORT as EVAL_REPORT
from pipeline.handoff import QUANT_REPORT, TRAIN_METRICS
from pipeline.train.adapt import MANIFEST

# a stage is done when its result file is there, whoever ran it (the CLI, a test, a Ray job)
RESULTS = {
    "curate": "stats.json",
    "train": TRAIN_METRICS,
    "quantize": QUANT_REPORT,
    "distill": TRAIN_METRICS,
    "adapters": None,  # one folder per adapter, each with its manifest
    "eval": EVAL_REPORT,
    "serve": None,  # nothing on disk: only the journal knows
}


@dataclass
class Stage:
    name: str
    status: str  # done, running, failed, killed, skipped, or "" (not run)
    seconds: float | None = None
    reason: str = ""


@dataclass
class Run:
    name: str
    path: Path
    status: str  # done, running, failed, killed, interrupted, or "done" for runs the CLI did not record
    reason: str = ""
    command: str = ""
    started: float | None = None
    config: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    progress: dict = field(default_factory=dict)  # the running training stage's last step and loss


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _has_result(run: Path, stage: str) -> bool:
    folder = run / stage
    if stage == "adapters":
        return folder.is_dir() and any((d / MANIFEST).is_file() for d in folder.iterdir())
    return RESULTS[stage] is not None and (folder / RESULTS[stage]).is_file()


def _last_command(events: list[dict]) -> tuple[dict | None, list[dict]]:
    """The last `command` event and the events after it."""
    starts = [i for i, e in enumerate(events) if e["event"] == "command"]
    if not starts:
        return None, []
    return events[starts[-1]], events[starts[-1] + 1 :]


def _command_status(command: dict | None, after: list[dict]) -> tuple[str, str]:
    ends = [e for e in after if e["event"] == "end"]
    if ends:
        return ends[-1]["status"], ends[-1].get("reason", "")
    if command is None:
        return "done", ""
    if _alive(command.get("pid")):
        return "running", ""
    return "killed", f"process {command.get('pid')} ended without saying how (killed?)"


def _stages(run: Path, events: list[dict], after: list[dict], status: str, reason: str) -> list[Stage]:
    """Each stage that ran: done by its result file (with its last recorded wall time), then as the
    last command's events (`after`) say."""
    seconds = {e["stage"]: e["seconds"] for e in events if e["event"] == "stage_done"}
    stages = {name: Stage(name, "done" if _has_result(run, name) else "", seconds.get(name)) for name in RESULTS}
    for e in after:
        if e["event"] not in ("stage", "stage_done", "stage_skipped"):
            continue
        stage = stages.setdefault(e["stage"], Stage(e["stage"], ""))
        if e["event"] == "stage":  # the stage a command was in shares its fate until it says it is done
            stage.status, stage.reason = status, reason
        elif e["event"] == "stage_done":
            stage.status, stage.reason, stage.seconds = "done", "", e["seconds"]
        else:
            stage.status = "skipped"
    return [s for s in stages.values() if s.status]


def read_run(path: Path) -> Run:
    events = journal.read(path)
    command, after = _last_command(events)
    status, reason = _command_status(command, after)
    run = Run(path.name, path, status, reason)
    if command is not None:
        run.command, run.started, run.config = command["command"], command["time"], command["config"]
    run.stages = _stages(path, events, after, status, reason)
    if status == "running":
        run.progress = training_progress(path)
    return run


def list_runs(runs_dir: Path) -> list[Run]:
    """Every run under `runs_dir`, the newest first: a folder with a journal or a stage result."""
    if not runs_dir.is_dir():
        return []
    runs = [
        read_run(d)
        for d in runs_dir.iterdir()
        if d.is_dir() and ((d / journal.JOURNAL).is_file() or any(_has_result(d, s) for s in RESULTS if RESULTS[s]))
    ]
    return sorted(runs, key=lambda r: r.started or r.path.stat().st_mtime, reverse=True)


def training_progress(run: Path) -> dict:
    """The newest progress.json of the run's training stages: {"stage", "step", "loss"}."""
    found = sorted((run / "train").glob("*/progress.json"), key=lambda p: p.stat().st_mtime)
    return {"stage": found[-1].parent.name, **json.loads(found[-1].read_text())} if found else {}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---- data ------------------------------------------------------------------------------------------
def curate_stats(run: Path) -> dict | None:
    return _json(run / "curate" / "stats.json")


def documents(run: Path, which: str, reason: str = "", offset: int = 0, limit: int = 20) -> tuple[list[dict], int]:
    """A page of the kept or rejected documents (rejected ones filtered by reason), and how many match."""
    folder = run / "curate" / which
    if which not in ("kept", "rejected") or not folder.is_dir():
        return [], 0
    dataset = pads.dataset(folder, format="parquet")
    table = dataset.to_table(filter=pc.field("reason") == reason if reason and which == "rejected" else None)
    rows = table.slice(offset, limit).to_pylist()
    return rows, table.num_rows


def document(run: Path, which: str, doc_id: str) -> dict | None:
    folder = run / "curate" / which
    if which not in ("kept", "rejected") or not folder.is_dir():
        return None
    rows = pads.dataset(folder, format="parquet").to_table(filter=pc.field("id") == doc_id).to_pylist()
    return rows[0] if rows else None


def marked_diff(survivor: str, duplicate: str) -> tuple[str, str]:
    """Both texts as HTML, words only one of them has wrapped in <del> (survivor) and <ins> (duplicate).
    Words are compared without the spaces and line breaks after them, which are kept for display."""
    a, b = re.findall(r"\S+\s*", survivor), re.findall(r"\S+\s*", duplicate)
    matcher = difflib.SequenceMatcher(None, [w.strip() for w in a], [w.strip() for w in b], autojunk=False)
    left, right = [], []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        old, new = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        left.append(old if op == "equal" or not old else f"<del>{old}</del>")
        right.append(new if op == "equal" or not new else f"<ins>{new}</ins>")
    return "".join(left), "".join(right)


# ---- training ---------------------------------------------------------------------------------------
def _stage_order(run: Path) -> list[str]:
    """Training stages in the order they ran: train/metrics.json names them once training ended; while it
    runs, the stage folders by when their TensorBoard logs began."""
    summary = _json(run / "train" / TRAIN_METRICS)
    if summary and summary.get("stages"):
        return [s["stage"] for s in summary["stages"]]
    folders = [d for d in (run / "train").glob("*/tensorboard") if d.is_dir()]
    return [d.parent.name for d in sorted(folders, key=lambda d: d.stat().st_ctime)]


def _scalars(tensorboard: Path) -> list[dict]:
    """One dict per step of what the stage's rank 0 logged (the last value of a step logged twice by a
    resumed run), with the same keys as metrics.json's history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard.is_dir():  # a stage that has not logged yet
        return []
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0}).Reload()
    by_step: dict[int, dict] = {}
    for tag in events.Tags()["scalars"]:
        key = tag.split("/", 1)[1]
        for e in events.Scalars(tag):
            by_step.setdefault(e.step, {"step": e.step})[key] = e.value
    return [by_step[step] for step in sorted(by_step)]


def training_histories(run: Path) -> tuple[dict[str, list[dict]], int | None]:
    """Each training stage's logged steps (live while it runs), and the step counted over all stages at
    which early stopping ended a stage, if one did."""
    histories, offset, stopped_at = {}, 0, None
    for name in _stage_order(run):
        history = _scalars(run / "train" / name / "tensorboard")
        histories[name] = history
        summary = _json(run / "train" / name / TRAIN_METRICS) or {}
        if summary.get("stopped_early") and history:
            stopped_at = offset + history[-1]["step"]
        offset += history[-1]["step"] if history else 0
    return histories, stopped_at


def training_summary(run: Path) -> dict | None:
    summary = _json(run / "train" / TRAIN_METRICS)
    return {k: v for k, v in summary.items() if k != "history"} if summary else None


# ---- export, eval, adapters ---------------------------------------------------------------------------
def quant_report(run: Path) -> dict | None:
    return _json(run / "quantize" / QUANT_REPORT)


def eval_report(run: Path) -> dict | None:
    return _json(run / "eval" / EVAL_REPORT)


def adapters(run: Path) -> dict[str, dict]:
    folder = run / "adapters"
    if not folder.is_dir():
        return {}
    return {
        d.name: json.loads((d / MANIFEST).read_text()) for d in sorted(folder.iterdir()) if (d / MANIFEST).is_file()
    }
