"""When `pipeline run` may skip a stage (pipeline.completion): only when the stage's marker carries the
digest of the same settings and inputs as now, for it and every stage before it. Pure rules: no Ray."""

import json

from conftest import TINY
from pipeline.completion import clear_done, finished, mark_done, stage_digest
from pipeline.config import load_config


def config(tmp_path, *overrides):
    return load_config(TINY, [f"runs_dir={tmp_path / 'runs'}", f"data.input=[{tmp_path}/*.jsonl]", *overrides])


def finish(cfg, stage, summary):
    cfg.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    name = {"curate": "stats.json", "quantize": "quant_report.json"}.get(stage, "metrics.json")
    (cfg.stage_dir(stage) / name).write_text(json.dumps(summary))
    mark_done(cfg, stage)


def test_a_stage_is_skipped_only_with_the_same_settings_and_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = config(tmp_path)
    assert finished(cfg, "curate") is None  # never ran
    for stage in ("curate", "train", "quantize"):
        finish(cfg, stage, {"stage": stage})
    assert finished(cfg, "train") == {"stage": "train"}
    # serving settings change nothing that was computed
    assert finished(config(tmp_path, "serve.max_new_tokens=7"), "quantize") == {"stage": "quantize"}
    # a training setting: train and what follows are redone, curate is not
    changed = config(tmp_path, "train.lr=0.1")
    assert finished(changed, "curate") is not None
    assert finished(changed, "train") is None and finished(changed, "quantize") is None
    # a quantize setting: only quantize
    assert finished(config(tmp_path, "quantize.group_size=64"), "train") is not None
    assert finished(config(tmp_path, "quantize.group_size=64"), "quantize") is None


def test_changed_input_files_redo_every_stage_after_them(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = config(tmp_path)
    finish(cfg, "curate", {})
    finish(cfg, "train", {})
    before = stage_digest(cfg, "train")
    (tmp_path / "a.jsonl").write_text('{"text": "two"}\n')  # same name, new content
    assert stage_digest(cfg, "train") != before
    assert finished(cfg, "curate") is None and finished(cfg, "train") is None


def test_a_stage_that_started_again_is_not_done_until_it_ends(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = config(tmp_path)
    finish(cfg, "curate", {})
    clear_done(cfg, "curate")  # what a run does first: killed now, its folder holds no finished stage
    assert finished(cfg, "curate") is None


def test_a_run_without_a_corpus_marks_its_stages_too(tmp_path):
    """The README's own-model path trains on instruction data alone: data.input matches no file."""
    cfg = config(tmp_path)  # tmp_path holds no .jsonl
    finish(cfg, "train", {"stage": "train"})
    assert finished(cfg, "train") == {"stage": "train"}
