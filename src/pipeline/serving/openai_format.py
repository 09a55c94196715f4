"""OpenAI wire format: errors, completion bodies and server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import JSONResponse

from pipeline.serving.types import Completion, TokenLogprob


class APIError(Exception):
    """An error the client caused (or may retry): always a 4xx with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.param)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]} for t in tokens]}


def completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The legacy completions API's shape: parallel lists, top alternatives as {token: logprob}."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def completion_body(
    model: str,
    choices: list[Completion],
    chat: bool,
    prompt_tokens: int,
    completion_tokens: int,
    echo: str | None = None,
) -> dict:
    """`prompt_tokens` and `completion_tokens` are counted by the caller, as for a stream of the same text.
    `echo`: the prompt, which each completion's text (and its logprobs, when asked) then starts with."""
    bodies = []
    for index, c in enumerate(choices):
        tokens = (c.prompt_logprobs or []) + c.logprobs if echo is not None and c.logprobs is not None else c.logprobs
        logprobs = tokens and (chat_logprobs if chat else completion_logprobs)(tokens)
        choice = {"index": index, "finish_reason": c.finish_reason, "logprobs": logprobs}
        text = c.text if echo is None else echo + c.text
        choice.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": text})
        bodies.append(choice)
    return {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": bodies,
        "usage": usage(prompt_tokens, completion_tokens),
    }


class ChunkWriter:
    """Builds the `data: ...` lines of one streamed response."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _event(self, choices: list, **extra) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def piece(self, text: str, first: bool = False, finish_reason: str | None = None) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return self._event([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])
        return self._event([{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
