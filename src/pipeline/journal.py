"""What was run on a run folder and how it ended: runs/<name>/journal.jsonl, one JSON line per event.

The CLI appends a `command` line when a command starts (its arguments, config and pid),
a `stage` line when a stage starts and a `stage_done` line with its wall time, and an `end` line
with `done` or `failed` and the one-line reason the terminal showed. The console reads it back
(pipeline.console.runs): a command with no `end` line is running while its pid lives, and was killed
otherwise. Appending whole lines keeps it readable while a run writes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import terminal
from pipeline.config import PipelineConfig
from pipeline.storage import cache_dir, is_uri

JOURNAL = "journal.jsonl"
_unwritable: set[Path] = set()  # journals this process could not append to; said once each


def run_folder(cfg: PipelineConfig) -> Path:
    """runs/<name>; for a URI runs_dir, the run's folder in the local cache (logs and journal stay local)."""
    return (cache_dir(cfg.runs_dir) if is_uri(cfg.runs_dir) else Path(cfg.runs_dir)) / cfg.name


def record(cfg: PipelineConfig, event: str, **fields) -> None:
    """Appends one event. The journal only records a run: on a full or read-only disk the command
    fails where it writes its outputs, with an error that names them, and a journal line that cannot
    be written must not stop it earlier or replace that error."""
    path = run_folder(cfg) / JOURNAL
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
    except OSError as e:
        if path not in _unwritable:
            _unwritable.add(path)
            terminal.say(f"journal: could not append to {path} ({e.strerror}); the console will not show the rest")


def command_started(cfg: PipelineConfig, command: str, argv: list[str]) -> None:
    record(cfg, "command", command=command, argv=argv, pid=os.getpid(), config=cfg.model_dump(mode="json"))


def read(run: Path) -> list[dict]:
    """The events of the run folder `run`, oldest first; a line cut short by a kill is left out."""
    path = run / JOURNAL
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


@contextmanager
def stage(cfg: PipelineConfig, name: str) -> Iterator[None]:
    """Records that stage `name` started, then (if it returns) its wall time."""
    record(cfg, "stage", stage=name)
    t0 = time.time()
    yield
    record(cfg, "stage_done", stage=name, seconds=round(time.time() - t0, 1))
