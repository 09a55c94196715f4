"""Shared by the rayjobs/ entrypoints: make the package importable from a `--working-dir` upload
(where it may not be pip-installed), then hand over to the CLI, which prints where outputs went
and exits non-zero with a clear message on failure."""
from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def run_stage(stage: str) -> int:
    from pipeline.cli import main

    return main([stage, *sys.argv[1:]])
