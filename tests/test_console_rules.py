"""The console's reading of run folders and its HTTP rules, without Ray: journals written as the CLI
writes them, curate output written as Parquet, the app driven through Starlette's TestClient."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from pipeline import journal
from pipeline.config import load_config
from pipeline.console import runs
from pipeline.console.app import Settings, make_app, sha256
from pipeline.console.launch import entrypoint

TINY = "configs/tiny.yaml"


def config(tmp_path, name="r1"):
    return load_config(TINY, [f"runs_dir={tmp_path}", f"name={name}"])


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_finished_command_gives_each_stage_its_wall_time(tmp_path):
    cfg = config(tmp_path)
    journal.command_started(cfg, "run", ["run"])
    for stage in ("curate", "train"):
        with journal.stage(cfg, stage):
            pass
    journal.record(cfg, "stage_skipped", stage="quantize")
    journal.record(cfg, "end", status="done")
    run = runs.read_run(tmp_path / "r1")
    assert (run.status, run.command, run.config["name"]) == ("done", "run", "r1")
    assert [(s.name, s.status) for s in run.stages] == [("curate", "done"), ("train", "done"), ("quantize", "skipped")]
    assert all(s.seconds is not None for s in run.stages[:2])


def test_a_journal_that_cannot_be_written_is_said_once_and_stops_nothing(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where the runs folder would be")
    cfg = config(tmp_path / "taken")
    journal.command_started(cfg, "run", ["run"])
    journal.record(cfg, "end", status="failed", reason="the command's own error")
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith(f"journal: could not append to {tmp_path / 'taken' / 'r1'}")


def test_a_failed_stage_carries_the_reason_and_earlier_stages_stay_done(tmp_path):
    cfg = config(tmp_path)
    journal.command_started(cfg, "run", ["run"])
    with journal.stage(cfg, "curate"):
        pass
    journal.record(cfg, "stage", stage="train")
    journal.record(cfg, "end", status="failed", reason="train.lr must be positive")
    run = runs.read_run(tmp_path / "r1")
    assert (run.status, run.reason) == ("failed", "train.lr must be positive")
    assert {s.name: (s.status, s.reason) for s in run.stages} == {
        "curate": ("done", ""),
        "train": ("failed", "train.lr must be positive"),
    }


def test_a_command_without_an_end_is_running_while_its_process_lives_and_killed_after(tmp_path):
    cfg = config(tmp_path)
    journal.command_started(cfg, "train", ["train"])  # this process: alive
    journal.record(cfg, "stage", stage="train")
    (tmp_path / "r1" / "train" / "sft").mkdir(parents=True)
    (tmp_path / "r1" / "train" / "sft" / "progress.json").write_text(json.dumps({"step": 7, "loss": 3.5}))
    run = runs.read_run(tmp_path / "r1")
    assert (run.status, run.stages[0].status, run.progress) == (
        "running",
        "running",
        {"stage": "sft", "step": 7, "loss": 3.5},
    )

    lines = (tmp_path / "r1" / journal.JOURNAL).read_text().splitlines()
    first = json.loads(lines[0])
    first["pid"] = dead_pid()
    (tmp_path / "r1" / journal.JOURNAL).write_text("\n".join([json.dumps(first), *lines[1:], '{"event": "sta']))
    run = runs.read_run(tmp_path / "r1")  # the cut last line (a kill mid-write) is passed over
    assert run.status == "killed" and "ended without saying how" in run.reason
    assert run.stages[0].status == "killed"


def test_stages_run_outside_the_cli_are_done_when_their_results_are_there(tmp_path):
    (tmp_path / "old" / "curate").mkdir(parents=True)
    (tmp_path / "old" / "curate" / "stats.json").write_text("{}")
    (tmp_path / "not-a-run").mkdir()
    (listed,) = runs.list_runs(tmp_path)
    assert (listed.name, listed.status, [s.name for s in listed.stages]) == ("old", "done", ["curate"])


def test_a_near_duplicate_marks_the_words_only_one_side_has():
    survivor, duplicate = runs.marked_diff("the cat sat\non the mat", "the cat sat\non a mat <b>")
    assert survivor == "the cat sat\non <del>the </del>mat"
    assert duplicate == "the cat sat\non <ins>a </ins>mat <ins>&lt;b&gt;</ins>"


def test_launch_takes_known_commands_and_key_value_overrides_only():
    argv = entrypoint("curate", "configs/tiny.yaml", ["name=x"])
    assert (
        argv[0].endswith("rayjobs/curate.py")
        and os.path.isfile(argv[0])
        and argv[1:] == ["--config", "configs/tiny.yaml", "name=x"]
    )
    assert entrypoint("run", "c.yaml", [])[0].endswith("rayjobs/pipeline.py")
    with pytest.raises(ValueError, match="unknown command 'rm'"):
        entrypoint("rm", "c.yaml", [])
    with pytest.raises(ValueError, match="key.sub=value, not --fresh"):
        entrypoint("train", "c.yaml", ["--fresh"])


@pytest.fixture()
def curated(tmp_path):
    """A run whose curate kept one document and rejected its near copy and a short one."""
    kept, rejected = tmp_path / "r1" / "curate" / "kept", tmp_path / "r1" / "curate" / "rejected"
    kept.mkdir(parents=True)
    rejected.mkdir(parents=True)
    text = "Permission is hereby granted free of charge to any person"
    pq.write_table(pa.table({"id": ["a"], "text": [text], "source": ["x.jsonl"], "meta": [""]}), kept / "0.parquet")
    rows = {
        "id": ["b", "c"],
        "text": [text.replace("free", "FREE"), "too short"],
        "source": ["x.jsonl"] * 2,
        "meta": [""] * 2,
        "reason": ["near duplicate", "too short (< 5 words)"],
        "step": ["fuzzy_dedup", "filters"],
        "duplicate_of": ["a", ""],
        "jaccard": [0.9, None],
    }
    pq.write_table(pa.table(rows), rejected / "0.parquet")
    stats = {"docs_in": 3, "kept": 1, "rejected": 2, "input_mb": 0.0, "mb_per_s": 0.0, "by_reason": {}, "by_step": {}}
    (tmp_path / "r1" / "curate" / "stats.json").write_text(json.dumps(stats))
    return tmp_path


def client(runs_dir, key=None, **kwargs) -> TestClient:
    return TestClient(make_app(Settings(runs_dir, "http://127.0.0.1:9", sha256(key))), **kwargs)


def test_the_data_pages_filter_by_reason_and_show_a_near_duplicate_beside_its_survivor(curated):
    http = client(curated)
    page = http.get("/runs/r1/data", params={"which": "rejected", "reason": "too short (< 5 words)"}).text
    assert "1 rejected" in page and ">c<" in page and ">b<" not in page
    page = http.get("/runs/r1/data/rejected/b").text
    assert "near duplicate of <b>a</b>" in page and "<del>free </del>" in page and "<ins>FREE </ins>" in page


def test_bad_requests_get_a_4xx_with_a_message(curated):
    http = client(curated)
    assert http.get("/runs/nope").json() == {"detail": f"no run named 'nope' under {curated}"}
    assert http.get("/runs/r1/data", params={"which": "all"}).status_code == 400
    assert http.get("/runs/r1/data/rejected/zzz").status_code == 404
    assert http.get("/runs/r1/file/../../etc/passwd").status_code == 404
    reply = http.post("/launch", data={"command": "curate", "config": TINY, "overrides": "--fresh"})
    assert reply.status_code == 400 and "key.sub=value" in reply.json()["detail"]
    reply = http.post("/api/chat", json={"prompt": ""})
    assert reply.status_code == 422
    reply = http.get("/api/models")  # nothing listens on port 9
    assert reply.status_code == 502 and "does not answer" in reply.json()["detail"]


def test_with_a_key_every_page_needs_it_by_header_or_login_cookie(curated):
    http = client(curated, key="s3cret")
    assert http.get("/").status_code == 401 and "API key" in http.get("/").json()["error"]
    assert http.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert http.get("/login", params={"key": "wrong"}).status_code == 401
    (curated / "login").mkdir()  # a run named like the login route is no way around the key
    assert http.get("/runs/login").status_code == 401
    assert http.get("/login", params={"key": "s3cret"}).status_code == 200  # redirected to the runs page
    assert "r1" in http.get("/").text  # the cookie from /login


def test_under_a_route_prefix_every_link_starts_with_it(curated):
    page = client(curated, root_path="/console").get("/console/").text
    assert 'href="/console/runs/r1"' in page and 'fetch("/console/fragments/runs")' in page


def test_a_jobs_log_shows_a_progress_bar_once_in_its_last_state(tmp_path):
    from pipeline.console.launch import Job, Launcher

    log = tmp_path / "job.log"
    log.write_text("curate: 2 files\ncurate:  0%|  | 0/4\rcurate: 50%|# | 2/4\rcurate: 100%|##| 4/4\r\ndone\n")
    job = Job("curate-1", "curate", [], 0.0, "local", log=log)
    assert Launcher(tmp_path).logs(job) == "curate: 2 files\ncurate: 100%|##| 4/4\ndone\n"


def test_the_console_refuses_to_listen_beyond_this_machine_without_a_key(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("PIPELINE_API_KEY", raising=False)
    assert main(["console", "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 opens the console beyond this machine: set PIPELINE_API_KEY" in capsys.readouterr().err


def test_the_export_page_shows_the_eval_report_as_a_table_with_deltas_and_the_gate(curated):
    score = {"value": 0.5, "stderr": 0.01, "higher_is_better": True}
    report = {
        "reference": "merged",
        "models": {
            "merged": {"scores": {"qa": {"acc": score}}},
            "awq": {"scores": {"qa": {"acc": {**score, "value": 0.45}}}},
        },
        "deltas": {"awq": {"qa": {"acc": -0.05}}},
        "gate": [{"model": "awq", "task": "qa", "metric": "acc", "max_drop": 0.1, "reference": "merged",
                  "value": 0.45, "reference_value": 0.5, "drop": 0.05, "passed": True}],
    }  # fmt: skip
    (curated / "r1" / "eval").mkdir()
    (curated / "r1" / "eval" / "report.json").write_text(json.dumps(report))
    page = client(curated).get("/runs/r1/export").text
    assert "<td>awq</td><td>qa</td><td>acc</td>" in page and "-0.0500" in page and "0.4500 &plusmn; 0.0100" in page
    assert "passed" in page


def test_the_export_page_lists_each_adapter_with_its_losses_and_its_4_bit_base(curated):
    manifest = {
        "adapter": "support",
        "rank": 8,
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "metrics": [{"stage": "sft", "eval_loss_before": 6.7, "eval_loss_last": 5.8}],
        "quantized_base": {"merged_perplexity": 30.0, "quantized_perplexity": 30.3, "perplexity_change": 0.01,
                           "passed": True},
    }  # fmt: skip
    (curated / "r1" / "adapters" / "support").mkdir(parents=True)
    (curated / "r1" / "adapters" / "support" / "manifest.json").write_text(json.dumps(manifest))
    page = client(curated).get("/runs/r1/export").text
    assert "<td>support</td><td>8</td><td>q_proj, v_proj</td>" in page
    assert "sft: 6.7 &rarr; 5.8" in page and "30.0 &rarr; 30.3 (+1.00%)" in page


def test_training_curves_come_from_tensorboard_per_stage_with_the_early_stop_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "r1"
    for stage, steps in (("pretrain", [1, 5, 10]), ("sft", [1, 5])):
        with SummaryWriter(str(run / "train" / stage / "tensorboard")) as writer:
            for step in steps:
                writer.add_scalar("train/loss", 5.0 - step / 10, step)
                writer.add_scalar("train/lr", 1e-3, step)
    (run / "train" / "sft" / "metrics.json").write_text(json.dumps({"stopped_early": True}))
    (run / "train" / "metrics.json").write_text(json.dumps({"stages": [{"stage": "pretrain"}, {"stage": "sft"}]}))
    histories, stopped_at = runs.training_histories(run)
    assert [h["step"] for h in histories["pretrain"]] == [1, 5, 10] and histories["sft"][1]["loss"] == 4.5
    assert stopped_at == 15  # sft's last step (5) after pretrain's 10
    (run / "train" / "dpo").mkdir()  # listed before it logs anything
    (run / "train" / "metrics.json").unlink()
    assert list(runs.training_histories(run)[0]) == ["pretrain", "sft"]
