"""The tasks models are scored on, as lm-evaluation-harness task configs (its own YAML format).

Shipped tasks (configs/eval_tasks/) work offline: `pipeline eval` writes their data from the run itself,
held-out documents and records only, so no model was trained on what it is scored on. A user's task files
work the same way, their data files read from their own folder; any other name goes to lm-eval's registry."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig
from pipeline.heldout import split_texts
from pipeline.train.data import instruction_files, split_records
from pipeline.train.formats import preference_texts, prompt_and_response

SHIPPED = Path(__file__).resolve().parents[3] / "configs" / "eval_tasks"
CHOICES = 4  # an instruction's answer among three others


def choice_questions(items: list[dict]) -> list[dict]:
    """Multiple-choice questions from held-out records: {group, prompt, answer, rejected}. A preference
    record asks its chosen answer against its rejected one; an instruction record its answer against the
    next distinct answers of its group (e.g. of its task; of all records when the group has too few).
    The right answer's place turns with the question, so no place is always right."""
    answers_of: dict[str, list[str]] = {}
    for item in items:
        group = answers_of.setdefault(item["group"], [])
        if item["answer"] not in group:
            group.append(item["answer"])
    everyone = list(dict.fromkeys(item["answer"] for item in items))
    questions = []
    for i, item in enumerate(items):
        if item.get("rejected") is not None:
            others = [item["rejected"]]
        else:
            pool = answers_of[item["group"]] if len(answers_of[item["group"]]) >= CHOICES else everyone
            start = pool.index(item["answer"])
            others = [a for a in pool[start + 1 :] + pool[:start] if a != item["answer"]][: CHOICES - 1]
        if not others:
            continue
        gold = i % (len(others) + 1)
        questions.append(
            {"prompt": item["prompt"], "choices": others[:gold] + [item["answer"]] + others[gold:], "gold": gold}
        )
    return questions


def held_out_items(files: list[tuple[str, str]], tokenizer, limit: int | None) -> list[dict]:
    """The held-out records of instruction (sft) and preference (dpo) files, as choice_questions reads them."""
    items: list[dict] = []
    for record, kind in split_records(files, held_out=True):
        if kind == "dpo":
            prompt, chosen, rejected = preference_texts(record, tokenizer)
            items.append({"group": "", "prompt": prompt, "answer": chosen, "rejected": rejected})
        else:
            prompt, answer = prompt_and_response(record, tokenizer)
            items.append({"group": str(record.get("task", "")), "prompt": prompt, "answer": answer})
        if len(items) == limit:
            return items
    return items


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_shipped_data(cfg: PipelineConfig, data_dir: Path, tokenizer) -> None:
    """The data files of the shipped tasks in eval.tasks, from this run's held-out split."""
    limit = cfg.eval.limit
    if "heldout_text" in cfg.eval.tasks:
        texts = split_texts(cfg.stage_dir("curate") / "kept", limit, held_out=True)  # None: all
        if not texts:
            raise ConfigError("eval task heldout_text: the curated corpus has no held-out documents")
        _write_jsonl(data_dir / "heldout_text.jsonl", [{"text": t} for t in texts])
    if "instruction_choice" in cfg.eval.tasks:
        stages = [*cfg.train.stages, *(stage for adapter in cfg.adapters for stage in adapter.stages)]
        files = instruction_files(stages)
        questions = choice_questions(held_out_items(files, tokenizer, limit))
        if not questions:
            raise ConfigError(
                "eval task instruction_choice is built from the held-out records of the instruction or preference "
                f"files in train.stages and adapters; {'these have none' if files else 'there are none'} "
                f"({', '.join(p for p, _ in files) or 'no sft or dpo stage'}): drop it from eval.tasks"
            )
        _write_jsonl(data_dir / "instruction_choice.jsonl", questions)


def task_config(path: Path, data_dir: Path) -> dict:
    """A task YAML as lm-eval reads it, its data_files made absolute from `data_dir`; a missing one is an
    error that names it (lm-eval would look for it on the dataset hub)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: includes and !function tags

    config = load_yaml(path)
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, str | list):
        files = {"test": files}
    for split, names in (files or {}).items():
        absolute = [str(data_dir / name) for name in ([names] if isinstance(names, str) else names)]
        missing = [name for name in absolute if not Path(name).is_file()]
        if missing:
            raise ConfigError(
                f"eval task {config.get('task', path.stem)} ({path}): its data file {missing[0]} is missing"
            )
        files[split] = absolute
    if files:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def task_specs(cfg: PipelineConfig, data_dir: Path) -> list[dict | str]:
    """eval.tasks for lm-eval: a task of eval.task_files, a shipped task, or a name of lm-eval's registry."""
    from lm_eval.tasks._yaml_loader import load_yaml

    own = {}
    for file in map(Path, cfg.eval.task_files):
        if not file.is_file():
            raise ConfigError(f"eval.task_files: {file} does not exist")
        own[load_yaml(file, resolve_func=False).get("task", file.stem)] = file
    specs: list[dict | str] = []
    for name in cfg.eval.tasks:
        if name in own:
            specs.append(task_config(own[name], own[name].parent))
        elif (SHIPPED / f"{name}.yaml").is_file():
            specs.append(task_config(SHIPPED / f"{name}.yaml", data_dir))
        else:
            specs.append(name)
    return specs
