"""Bad input is caught in the driver before Ray starts, in seconds, as one line naming what is wrong
(file:line for data), without a traceback; -v adds the traceback."""

import json
import shutil
import time

import pytest
from transformers import AutoModelForCausalLM, Qwen2Config

from pipeline.cli import main


def run(capsys, *argv: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(list(argv))
    return code, capsys.readouterr().err, time.perf_counter() - start


@pytest.fixture()
def sft_config(tiny_model_dir, tmp_path):
    def make(data_lines: list[str], model=tiny_model_dir) -> list[str]:
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(line + "\n" for line in data_lines))
        return [
            "--config",
            "configs/tiny.yaml",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.path={model}",
            "train.lora.modules_to_save=[]",
            f"train.stages=[{{kind: sft, data: {data}}}]",
        ]

    return make


GOOD = json.dumps({"instruction": "Name the licence.", "input": "GPL text", "output": "GPL-2+"})


def test_a_broken_jsonl_line_is_named_by_file_and_line(capsys, sft_config, tmp_path):
    code, err, seconds = run(capsys, "train", *sft_config([GOOD, GOOD, GOOD[:-5]]))
    assert code == 2 and f"{tmp_path / 'sft.jsonl'}:3: not valid JSON" in err and "Traceback" not in err
    assert err.startswith("pipeline train: error: train.stages[sft].data:") and seconds < 10


def test_a_record_in_no_known_format_lists_the_formats(capsys, sft_config, tmp_path):
    code, err, seconds = run(capsys, "train", *sft_config([GOOD, json.dumps({"question": "?", "answer": "!"})]))
    assert seconds < 10 and code == 2 and "sft.jsonl:2: no known format has fields ['answer', 'question']" in err
    assert "Alpaca (instruction)" in err and "ShareGPT (conversations)" in err


def test_a_model_without_a_tokenizer_is_refused_up_front(capsys, sft_config, tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    code, err, seconds = run(capsys, "train", *sft_config([GOOD], model=bare))
    assert code == 2 and f"the tokenizer in {bare} does not load" in err and seconds < 10


def test_curate_refuses_a_file_of_unknown_format_up_front(capsys, tmp_path):
    (tmp_path / "README").write_text("no extension")
    code, err, seconds = run(
        capsys, "curate", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"data.input=[{tmp_path}/README]"
    )
    assert (
        seconds < 10
        and code == 2
        and "data.input:" in err
        and "README: unknown format" in err
        and "Traceback" not in err
    )


def test_awq_widths_off_the_group_size_suggest_quantize_ignore(capsys, tiny_model_dir, tmp_path):
    odd = tmp_path / "odd"
    AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=200,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(odd)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, odd / name)
    args = ["--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", f"model.path={odd}"]
    code, err, seconds = run(capsys, "quantize", *args)
    assert (
        seconds < 10
        and code == 2
        and "model.layers.0.mlp.down_proj 200" in err
        and "quantize.ignore=[re:.*down_proj$]" in err
    )


def test_any_failure_is_one_line_and_verbose_adds_the_traceback(capsys, tmp_path):
    args = ["quantize", "--config", "configs/tiny.yaml", f"runs_dir={tmp_path}", "train.stages=[{kind: sft}]"]
    code, err, _ = run(capsys, *args)
    assert code == 2 and err.count("\n") > 1 and "needs `data`" in err and "Traceback" not in err
    code, err, _ = run(capsys, "-v", "train", "--config", "configs/tiny.yaml", "train.lora.rr=1")
    assert code == 2 and "Traceback" in err and "train.lora.rr: unknown key; allowed here: alpha, dropout" in err
