"""The record formats that instruction and preference data come in, and what each becomes: a prompt
and the response the model learns (the prompt's tokens are not learned). One JSON object a line:

- multi-task: {"task": "license", "input": "This program is free software ...", "output": "GPL-2+"}
- Alpaca: {"instruction": "Name the licence.", "input": "This program is ...", "output": "GPL-2+"}
  (input may be empty or absent)
- ShareGPT: {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
- OpenAI messages: {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
  (a content may be a list of {"type": "text", "text": ...} parts)
- plain text: {"text": "..."} (the whole text is learned)
- preference pair: {"prompt": ..., "chosen": ..., "rejected": ...}, each a string or a message list

Multi-task and Alpaca records use the [TASK] / [INPUT] / [OUTPUT] template; conversations use the
tokenizer's chat template (the last message, the assistant's, is learned). Which format a record is
in follows from its fields, so one file may mix them. The README has the same table.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.multitask import format_instruction

FORMATS = {  # a field that only this format has -> its name
    "messages": "OpenAI messages",
    "conversations": "ShareGPT",
    "task": "multi-task",
    "instruction": "Alpaca",
    "text": "plain text",
}
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}


class RecordError(ValueError):
    """A record no known format fits; the message says what is missing or wrong."""


def record_format(record: dict) -> str:
    found = [name for field, name in FORMATS.items() if field in record]
    if not found:
        expected = "; ".join(f"{name} ({field})" for field, name in FORMATS.items())
        raise RecordError(f"no known format has fields {sorted(record)}; expected one of: {expected}")
    return found[0]


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string (got {type(value).__name__})")
    return value


def message_content(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (their text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = sorted({repr(p.get("type")) for p in content} - {"'text'"})  # repr: a type may be any JSON
        if kinds:
            raise RecordError(f"{where}: only text content parts are supported (got type {', '.join(kinds)})")
        return "".join(_text(p.get("text"), f"{where} text part") for p in content)
    raise RecordError(f"{where}: content must be a string or a list of text parts (got {type(content).__name__})")


def messages_of(record: dict) -> list[dict]:
    """The conversation as [{role, content}], from OpenAI messages or ShareGPT conversations."""
    sharegpt = "conversations" in record
    turns = record["conversations" if sharegpt else "messages"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{'conversations' if sharegpt else 'messages'} must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        where = f"message {i}"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} must be an object")
        role = turn.get("from" if sharegpt else "role")
        if role not in ROLES:
            raise RecordError(f"{where}: unknown role {role!r}; expected one of {sorted(ROLES)}")
        out.append(
            {"role": ROLES[role], "content": message_content(turn.get("value" if sharegpt else "content"), where)}
        )
    return out


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise RecordError(
            "a record is a conversation but the tokenizer has no chat template; use "
            "{task, input, output} or Alpaca records, or a model whose tokenizer has one"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_and_response(record: dict, tokenizer) -> tuple[str, str]:
    """What an instruction record asks and what the model should answer."""
    kind = record_format(record)
    if kind in ("OpenAI messages", "ShareGPT"):
        messages = messages_of(record)
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"the last message must be the assistant's, to learn (got {messages[-1]['role']})")
        return render_chat(messages[:-1], tokenizer, add_generation_prompt=True), messages[-1]["content"]
    if kind == "plain text":
        return "", _text(record["text"], "text")
    if kind == "multi-task":
        missing = [k for k in ("task", "input", "output") if record.get(k) is None]
        if missing:
            raise RecordError(f"a multi-task record needs task, input and output; it lacks {missing}")
        return format_instruction(_text(record["task"], "task"), _text(record["input"], "input")), _text(
            record["output"], "output"
        )
    if record.get("output") is None:
        raise RecordError("an Alpaca record needs output")
    return format_instruction(
        _text(record["instruction"], "instruction"), _text(record.get("input") or "", "input")
    ), _text(record["output"], "output")


def preference_texts(record: dict, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a preference pair; message lists go through the chat template."""
    missing = [k for k in ("prompt", "chosen", "rejected") if not record.get(k)]
    if missing:
        raise RecordError(f"a preference pair needs prompt, chosen and rejected; it lacks {missing}")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        prompt = render_chat(messages_of({"messages": prompt}), tokenizer, add_generation_prompt=True)
    answers = []
    for side in ("chosen", "rejected"):
        value = record[side]
        if isinstance(value, list):  # [..., {"role": "assistant", "content": ...}]: the last message answers
            value = messages_of({"messages": value})[-1]["content"]
        answers.append(_text(value, side))
    return _text(prompt, "prompt"), *answers


def check_file(path: str | Path, kind: str, tokenizer, limit: int = 1000) -> int:
    """Read up to `limit` records of a JSONL file as training of `kind` (sft or dpo) will; raise
    RecordError naming file:line on the first that does not fit. Returns the number read."""
    read = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if read == limit:
                break
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise RecordError(f"{where}: not UTF-8") from None
            except json.JSONDecodeError as e:  # noqa: PERF203
                raise RecordError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise RecordError(f"{where}: a record must be a JSON object (got {type(record).__name__})")
            try:
                (preference_texts if kind == "dpo" else prompt_and_response)(record, tokenizer)
            except RecordError as e:
                raise RecordError(f"{where}: {e}") from None
            read += 1
    if not read:
        raise RecordError(f"{path}: no records")
    return read
