"""Size limits on a request, enforced before its body is read whole. Headers over their limit are
answered 431 (Serve's HTTP proxy sets none). A Content-Length over the body limit is answered 413 at
once, and a body sent in chunks without one is cut off as soon as the chunks pass it. A JSON parser
given 50 MB would hold several times that in Python objects; the limits keep one request from costing
a replica more than a prompt could use."""

from __future__ import annotations

import contextlib

from pipeline.serving.openai_format import error_response


class _TooLarge(Exception):
    pass


def _too_large(limit: int):
    return error_response(
        413, f"request body is over this server's limit of {limit} bytes", "invalid_request_error", "body_too_large"
    )


class RequestLimits:
    """ASGI middleware; the limits are read from `app.state.limits`, (header bytes, body bytes), set when
    the replica starts."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limits = getattr(scope["app"].state, "limits", None) if scope["type"] == "http" else None
        if not limits:
            return await self.app(scope, receive, send)
        header_limit, limit = limits
        if (size := sum(len(k) + len(v) for k, v in scope["headers"])) > header_limit:
            message = f"request headers are {size} bytes; this server's limit is {header_limit}"
            refusal = error_response(431, message, "invalid_request_error", "headers_too_large")
            return await refusal(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(limit)(scope, receive, send)
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                over = True
                raise _TooLarge
            return message

        async def unless_over(message):
            if not over:  # the app's own answer to a body cut off mid-read is replaced by the 413
                await send(message)

        with contextlib.suppress(_TooLarge):  # the app may also catch it and answer; unless_over drops that
            await self.app(scope, counted, unless_over)
        if over:
            await _too_large(limit)(scope, receive, send)
