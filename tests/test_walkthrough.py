"""README's "Your own model and data", run as written: a self-made model directory and instruction and
preference data in every format the README lists, no curated corpus; SFT -> DPO -> AWQ -> endpoint ->
the openai client. Only the port is changed (to a free one). Then training the SFT stage again resumes
it and says so; after the model is rebuilt at the same path it starts fresh and says why; and an
adapter trained on the old model is refused on the new one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from conftest import REPO, free_port
from pipeline.config import ConfigError
from pipeline.model import train_tokenizer
from pipeline.sample_data import source_files, split_documents
from pipeline.serving.deploy import wait_healthy

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def readme_blocks() -> dict[str, str]:
    section = (REPO / "README.md").read_text().split("## Your own model and data")[1].split("\n## ")[0]
    return dict(re.findall(r"```(\w+)\n(.*?)```", section, re.S))


def build_model(out: Path, seed: int) -> None:
    texts = [d for p in source_files()[:60] for d in split_documents(p.read_text(errors="replace"))]
    tokenizer = train_tokenizer(texts, 1024)
    tokenizer.chat_template = CHAT
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def in_every_format(record: dict, i: int) -> dict:
    """The shipped multi-task records, rewritten in turn as each format the README lists."""
    question, answer = f"{record['task']}: {record['input']}", record["output"]
    return [
        record,
        {"instruction": record["task"], "input": record["input"], "output": answer},
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": question}]},
                {"role": "assistant", "content": answer},
            ]
        },
        {"text": f"{question} {answer}"},
    ][i % 5]


def pipeline(*args: str, cwd: Path) -> str:
    out = subprocess.run([str(BIN / "pipeline"), *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_the_readme_walkthrough_and_what_a_rerun_does(tmp_path):
    blocks, port = readme_blocks(), free_port()
    build_model(tmp_path / "my-model", seed=0)
    records = [json.loads(line) for line in (REPO / "data" / "instructions.jsonl").read_text().splitlines()]
    (tmp_path / "my-data.jsonl").write_text(
        "".join(json.dumps(in_every_format(r, i)) + "\n" for i, r in enumerate(records))
    )
    pairs = [json.loads(line) for line in (REPO / "data" / "preferences.jsonl").read_text().splitlines()]
    for pair in pairs[::2]:  # half of the prompts as message lists
        pair["prompt"] = [{"role": "user", "content": pair["prompt"]}]
    (tmp_path / "my-prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "mine.yaml").write_text(blocks["yaml"] + f"serve:\n  port: {port}\n")

    commands = [line.split() for line in blocks["bash"].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["pipeline", "train"], ["pipeline", "quantize"], ["pipeline", "serve"]]
    trained = pipeline(*commands[0][1:], cwd=tmp_path)
    assert "train/sft: starting at step 0 of 20" in trained and "train/dpo: starting at step 0 of 10" in trained
    pipeline(*commands[1][1:], cwd=tmp_path)
    report = json.loads((tmp_path / "runs/mine/quantize/quant_report.json").read_text())
    assert report["calibration"].startswith("the training data") and report["serve_model"] == "awq"
    server = subprocess.Popen(
        [str(BIN / "pipeline"), *commands[2][1:-1]],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=180)
        client = subprocess.run(
            [sys.executable, "-c", blocks["python"].replace("8000", str(port))],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    assert client.returncode == 0 and client.stdout.strip(), client.stderr[-2000:]

    # the SFT stage alone (its settings and inputs are the same with the DPO stage left out): its last
    # checkpoint is the result, and no worker group starts
    sft_only = "train.stages=[{kind: sft, data: my-data.jsonl, max_steps: 20}]"
    again = pipeline("train", "--config", "mine.yaml", sft_only, cwd=tmp_path)
    assert "train/sft: resuming from step 20 of 20" in again and "train/sft: step 20 was its last" in again

    old_adapter = tmp_path / "old-adapter"
    shutil.copytree(tmp_path / "runs/mine/train/sft/final/model", old_adapter)  # trained on my-model
    build_model(tmp_path / "my-model", seed=1)  # rebuilt at the same path
    fresh = pipeline("train", "--config", "mine.yaml", sft_only, cwd=tmp_path)
    assert "train/sft: starting fresh: its inputs changed (base_model)" in fresh
    from pipeline.merge import merge_adapter

    with pytest.raises(ConfigError, match="was trained on the base model in .*and .* is another model"):
        merge_adapter(tmp_path / "my-model", old_adapter, tmp_path / "merged", torch.float32, False)
