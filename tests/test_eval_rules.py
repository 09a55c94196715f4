"""The rules of `pipeline eval` as pure functions: the shipped tasks' questions, task files and their data,
reading lm-eval's output, deltas and the gate."""

import json

import pytest

from conftest import REPO, tiny_config
from pipeline.config import ConfigError, load_config
from pipeline.errors import QualityGateError
from pipeline.eval.report import check_gate, deltas, gate_verdicts, markdown, scores
from pipeline.eval.tasks import SHIPPED, choice_questions, task_config, task_specs


def test_a_question_offers_the_answer_among_others_of_its_group_in_a_turning_place():
    items = [{"group": "count", "prompt": f"how many {i}?", "answer": str(i)} for i in range(5)]
    items += [{"group": "name", "prompt": "who?", "answer": "Ada"}]  # a group of one: others from everyone
    items += [{"group": "", "prompt": "better?", "answer": "yes", "rejected": "no"}]  # a preference pair
    questions = choice_questions(items)
    assert [q["gold"] for q in questions] == [0, 1, 2, 3, 0, 1, 0]
    for item, q in zip(items, questions, strict=True):
        assert q["prompt"] == item["prompt"] and q["choices"][q["gold"]] == item["answer"]
        assert len(set(q["choices"])) == len(q["choices"])
    assert questions[0]["choices"] == ["0", "1", "2", "3"]  # the next answers of its own group
    assert set(questions[3]["choices"]) == {"3", "4", "0", "1"}
    assert "Ada" not in {c for q in questions[:5] for c in q["choices"]}
    assert len(questions[5]["choices"]) == 4
    assert questions[6]["choices"] == ["yes", "no"]
    assert choice_questions([{"group": "", "prompt": "p", "answer": "a"}]) == []  # nothing to choose from


def test_the_shipped_tasks_read_their_data_from_the_runs_eval_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"heldout_text .*data file .*heldout_text.jsonl is missing"):
        task_config(SHIPPED / "heldout_text.yaml", tmp_path)
    (tmp_path / "heldout_text.jsonl").write_text('{"text": "a b"}\n')
    config = task_config(SHIPPED / "heldout_text.yaml", tmp_path)
    assert config["dataset_path"] == "json" and config["output_type"] == "loglikelihood_rolling"
    assert config["dataset_kwargs"]["data_files"] == {"test": [str(tmp_path / "heldout_text.jsonl")]}


def test_eval_settings_are_checked_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="eval.models.0"):
        load_config(None, ["eval.models=[awk]"])
    with pytest.raises(ConfigError, match="eval.gate names task 'mmlu', which is not in eval.tasks"):
        load_config(None, ["eval.gate=[{model: awq, task: mmlu, metric: acc, max_drop: 0.01}]"])
    with pytest.raises(ConfigError, match="max_drop"):
        load_config(None, ["eval.gate=[{model: awq, task: heldout_text, metric: acc, max_drop: -1}]"])


def lm_eval_output(acc: float, ppl: float) -> dict:
    """What lm_eval.simple_evaluate returns, the parts the report reads."""
    return {
        "results": {
            "choice": {"alias": "choice", "acc,none": acc, "acc_stderr,none": 0.05, "acc_norm,none": acc},
            "text": {"alias": "text", "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"},
        },
        "higher_is_better": {"choice": {"acc": True, "acc_norm": True}, "text": {"word_perplexity": False}},
    }


def test_the_report_reads_every_metric_its_stderr_and_which_way_is_better():
    table = scores(lm_eval_output(0.5, 30.0))
    assert table["choice"]["acc"] == {"value": 0.5, "stderr": 0.05, "higher_is_better": True}
    assert table["choice"]["acc_norm"]["stderr"] is None
    assert table["text"] == {"word_perplexity": {"value": 30.0, "stderr": None, "higher_is_better": False}}


def test_the_gate_stops_a_model_that_lost_more_than_its_budget_and_names_the_numbers():
    models = {
        name: {"scores": scores(lm_eval_output(*s))} for name, s in {"merged": (0.6, 30.0), "awq": (0.5, 33.0)}.items()
    }
    gates = [
        {"model": "awq", "task": "choice", "metric": "acc", "max_drop": 0.2},
        {"model": "awq", "task": "text", "metric": "word_perplexity", "max_drop": 2},
    ]
    settings = load_config(None, ["eval.tasks=[choice, text]", f"eval.gate={json.dumps(gates)}"]).eval
    verdicts = gate_verdicts(models, settings)
    assert [(v["drop"], v["passed"]) for v in verdicts] == [(pytest.approx(0.1), True), (3.0, False)]
    with pytest.raises(
        QualityGateError,
        match=r"awq scores word_perplexity 33.0000 on text against merged's 30.0000, "
        r"3.0000 worse, over max_drop 2",
    ):
        check_gate(verdicts)
    check_gate(verdicts[:1])
    assert deltas(models, "merged") == {
        "awq": {"choice": {"acc": -0.1, "acc_norm": -0.1}, "text": {"word_perplexity": 3.0}}
    }
    missing = load_config(
        None, ["eval.tasks=[choice]", "eval.gate=[{model: awq, task: choice, metric: f1, max_drop: 0}]"]
    )
    with pytest.raises(QualityGateError, match="no f1 of awq and merged on choice .its metrics: acc, acc_norm"):
        gate_verdicts(models, missing.eval)


def test_the_markdown_table_has_a_row_per_model_task_and_metric_with_deltas():
    models = {n: {"scores": scores(lm_eval_output(a, 30.0))} for n, a in {"merged": 0.6, "awq": 0.5}.items()}
    table = markdown({"reference": "merged", "models": models, "deltas": deltas(models, "merged")})
    assert "| awq | choice | acc | 0.5000 ± 0.0500 | -0.1000 |" in table
    assert "| merged | text | word_perplexity | 30.0000 |  |" in table
    assert len(table.splitlines()) == 2 + 2 * 3


def test_a_task_file_whose_data_is_missing_is_a_clear_error(tmp_path):
    task = tmp_path / "mine.yaml"
    task.write_text(
        (REPO / "configs/eval_tasks/heldout_text.yaml").read_text().replace("task: heldout_text", "task: mine")
    )
    cfg = tiny_config(tmp_path, tmp_path, f"eval.task_files=[{task}]", "eval.tasks=[mine]")
    with pytest.raises(
        ConfigError, match=rf"eval task mine \({task}\): its data file {tmp_path}/heldout_text.jsonl is missing"
    ):
        task_specs(cfg, tmp_path / "data")


def rolling_windows(max_seq_len: int) -> list:
    """The windows lm-eval scores a 300-token document in (its loglikelihood_rolling)."""
    from lm_eval import utils

    windows = utils.get_rolling_token_windows(list(range(300)), prefix_token=-1, max_seq_len=max_seq_len, context_len=1)
    return [utils.make_disjoint_window(w) for w in windows]


def test_the_endpoint_is_scored_through_lm_evals_completions_backend_on_our_route():
    from pathlib import Path

    from pipeline.eval.harness import EvalModel, endpoint_args

    endpoint = EvalModel("endpoint", Path("/runs/x/quantize/awq"), url="http://127.0.0.1:8000", served_as="x")
    settings = load_config(None, ["eval.batch_size=4"]).eval
    assert endpoint_args(endpoint, settings, 1024, "secret") == {
        "base_url": "http://127.0.0.1:8000/v1/completions",
        "model": "x",
        "tokenizer": "/runs/x/quantize/awq",
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": 4,
        "max_length": 1025,  # windows of 1023 tokens, each sent after its context token: 1024, the server's limit
        "max_retries": 3,
        "header": {"Authorization": "Bearer secret"},
    }
    settings.max_length = 64
    assert "header" not in endpoint_args(endpoint, settings, 1024, None)
    api_length = endpoint_args(endpoint, settings, 1024, None)["max_length"]
    assert rolling_windows(api_length - 2) == rolling_windows(64)  # as lm-eval cuts for an API and for HF
    with pytest.raises(ConfigError, match=r"eval.max_length 64: .*serve.max_prompt_tokens \(64\)"):
        endpoint_args(endpoint, settings, 64, None)


def test_eval_models_name_the_folders_each_stage_left(tmp_path):
    from pipeline.eval.harness import resolve

    data = REPO / "data/instructions.jsonl"
    cfg = load_config(None, [f"runs_dir={tmp_path}", f"train.stages=[{{kind: pretrain}}, {{kind: sft, data: {data}}}]"])
    for folder in ("train/sft/base", "quantize/merged", "quantize/awq"):
        (tmp_path / cfg.name / folder).mkdir(parents=True)
        (tmp_path / cfg.name / folder / "config.json").write_text("{}")
    (tmp_path / cfg.name / "quantize/quant_report.json").write_text('{"serve_model": "awq"}')
    where = {name: resolve(cfg, name)[0] for name in ("stage:pretrain", "stage:sft", "served", "endpoint")}
    assert where["stage:pretrain"].path == tmp_path / cfg.name / "train/sft/base"  # the sft stage's start
    assert where["stage:sft"].path == tmp_path / cfg.name / "quantize/merged"  # the last stage: merged
    assert (where["served"].name, where["served"].path) == ("awq", tmp_path / cfg.name / "quantize/awq")
    assert where["endpoint"].path == where["served"].path and where["endpoint"].served_as == cfg.name
    with pytest.raises(FileNotFoundError, match="no training stage 'dpo'; train.stages has pretrain, sft"):
        resolve(cfg, "stage:dpo")
    with pytest.raises(FileNotFoundError, match="run `pipeline distill` first"):
        resolve(cfg, "student")
    with pytest.raises(ConfigError, match="no adapter support; run `pipeline adapt`"):
        resolve(cfg, "adapter:support")
