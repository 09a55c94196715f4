"""OpenAI wire format: errors, completion bodies and server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import JSONResponse

from pipeline.serving.types import Completion


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


def completion_body(model: str, c: Completion, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
    return {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
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
