"""The multi-task template ([TASK] / [INPUT] / [OUTPUT]): what instruction records train on
(train/formats.py) and what curate writes image-caption pairs as (curate/images.py)."""

from __future__ import annotations


def format_instruction(task: str, input_text: str, output: str | None = None) -> str:
    """`output=None` gives the prompt the model completes."""
    prompt = f"[TASK] {task}\n[INPUT] {input_text}\n[OUTPUT] "
    return prompt if output is None else prompt + output
