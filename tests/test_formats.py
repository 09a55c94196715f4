"""The data formats users bring (train/formats.py): each becomes the prompt and response training
learns, a file may mix them, and a record that fits none is reported as file:line with the reason."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.train.formats import RecordError, check_file, preference_texts, prompt_and_response

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture()
def tok(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.mark.parametrize(
    "record, prompt, response",
    [
        (
            {"task": "license", "input": "GPL text", "output": "GPL-2+"},
            "[TASK] license\n[INPUT] GPL text\n[OUTPUT] ",
            "GPL-2+",
        ),
        (
            {"instruction": "Name it.", "input": "GPL text", "output": "GPL-2+"},
            "[TASK] Name it.\n[INPUT] GPL text\n[OUTPUT] ",
            "GPL-2+",
        ),
        ({"instruction": "Say hi.", "output": "hi"}, "[TASK] Say hi.\n[INPUT] \n[OUTPUT] ", "hi"),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            },
            "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>",
            "Hello",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "<|user|>Hi\n<|assistant|>",
            "Hello",
        ),
        ({"text": "a whole document"}, "", "a whole document"),
    ],
    ids=["multi-task", "alpaca", "alpaca-no-input", "sharegpt", "openai-parts", "text"],
)
def test_each_format_becomes_a_prompt_and_its_response(tok, record, prompt, response):
    assert prompt_and_response(record, tok) == (prompt, response)


def test_preference_pairs_take_strings_or_message_lists(tok):
    assert preference_texts({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, tok) == ("Q?", "yes", "no")
    pair = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
    }
    assert preference_texts(pair, tok) == ("<|user|>Q?\n<|assistant|>", "yes", "no")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "?", "answer": "!"}, r"no known format has fields \['answer', 'question'\]"),
        ({"task": "t", "input": "i"}, r"lacks \['output'\]"),
        ({"instruction": "do"}, "needs output"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant's"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "only text content parts",
        ),
        ({"task": 3, "input": "i", "output": "o"}, "task must be a string"),
    ],
)
def test_a_record_that_fits_no_format_says_why(tok, record, message):
    with pytest.raises(RecordError, match=message):
        prompt_and_response(record, tok)


def test_conversations_need_a_chat_template(tiny_model_dir):
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(RecordError, match="no chat template"):
        prompt_and_response(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, plain
        )


def test_a_bad_line_is_reported_as_file_and_line(tok, tmp_path):
    good = json.dumps({"instruction": "Say hi.", "output": "hi"})
    cases = {
        "broken.jsonl": (f"{good}\n\n{good[:-3]}\n", ":3: not valid JSON"),
        "alpaca-for-dpo.jsonl": (f"{good}\n", ":1: a preference pair needs prompt, chosen and rejected"),
        "latin1.jsonl": (None, ":1: not UTF-8"),
        "empty.jsonl": ("\n", "no records"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode() if text is not None else '{"text": "caf\xe9"}\n'.encode("latin-1"))
        with pytest.raises(RecordError, match=f"{path}{message}" if message.startswith(":") else message):
            check_file(path, "dpo" if "dpo" in name else "sft", tok)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(f"{good}\n" + json.dumps({"task": "t", "input": "i", "output": "o"}) + "\n")
    assert check_file(mixed, "sft", tok) == 2
