"""Shared by the rayjobs/ entrypoints: make the package importable from a `--working-dir` upload
(where it may not be pip-installed), then hand over to the CLI, which prints where outputs went
and exits non-zero with a clear message on failure."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# Python put this folder first on sys.path; its serve.py would shadow the serve/ app package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
if str(HERE.parent) not in sys.path:
    sys.path.insert(1, str(HERE.parent))


def run_stage(stage: str) -> int:
    from pipeline.cli import main

    return main([stage, *sys.argv[1:]], capture=True)
