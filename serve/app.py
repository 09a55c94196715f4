"""The Ray Serve application: a FastAPI ingress (LLMServer) in front of the model replicas
(Generator, src/pipeline/serving/generator.py), which autoscale. The ingress checks keys, limits,
and prompts, and retries a call whose model replica died on a live one, so a replica crash does not
fail the requests it was serving.

Routes: POST /generate, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
GET /v1/models, GET /healthz, GET /metrics, POST /v1/adapters/reload, DELETE /v1/adapters/{name}.
The base model and each LoRA adapter under `adapters_dir` are models of their own: the OpenAI `model`
field (and /generate's) picks one. Adapters added to or rewritten in that folder are served without a
restart (pipeline/serving/adapters.py). Run it with
`pipeline serve --config FILE`, with `serve run serve.app:build_app model_dir=DIR`, or from a RayService serveConfigV2
(import_path: serve.app:build_app, args: the fields of ServeArgs).
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.loading import model_fingerprints
from pipeline.serving.adapters import Adapter, AdapterCatalog, withdraw
from pipeline.serving.engine import Tokenizer
from pipeline.serving.generator import Generator
from pipeline.serving.metrics import ServeMetrics
from pipeline.serving.openai_format import APIError, ChunkWriter, completion_body, error_response
from pipeline.serving.request_limits import RequestLimits
from pipeline.serving.schemas import ChatRequest, CompletionRequest, GenerateRequest, ServeArgs
from pipeline.serving.types import Completion, Prompt, Sampling, StopCutter

log = logging.getLogger("pipeline.serve")
api = FastAPI(
    title="llm-pipeline",
    description="Generation from the model the pipeline trained, with an OpenAI-compatible subset under /v1.",
)
api.add_middleware(RequestLimits)  # added before the middleware below, so inside it: its 413s and 431s are counted too
OPEN_ROUTES = {"/healthz", "/docs", "/openapi.json", "/redoc"}
REPLICA_DIED = (RayActorError, ActorUnavailableError)
RETRIES = 3  # tries on other model replicas after one died under a request
# below this, softmax(logits / T) overflows to inf (found by fuzzing: T=1e-300); sampling that cold is greedy
MIN_TEMPERATURE = 1e-3


def _key_ok(request: Request, key_sha256: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = hashlib.sha256(token.strip().encode()).hexdigest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, key_sha256)


def _route(request: Request) -> str:
    """The path inside this app (Serve mounts it under a route prefix, given as root_path)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


@api.middleware("http")
async def _auth_and_metrics(request: Request, call_next):
    """Every request: API key first (before the body is even parsed), then metrics."""
    state, start, path = request.app.state, time.perf_counter(), _route(request)
    if state.key_sha256 and path not in OPEN_ROUTES and not _key_ok(request, state.key_sha256):
        response = error_response(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            "invalid_api_key",
        )
    else:
        response = await call_next(request)
    # label by the matched route only: arbitrary 404 paths must not grow the metric set without bound
    route = getattr(request.scope.get("route"), "path", None) or "other"
    state.metrics.requests.labels(route, str(response.status_code)).inc()
    state.metrics.latency.labels(route).observe(time.perf_counter() - start)
    return response


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError):
    errors = exc.errors()
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors)
    param = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else None
    return error_response(400, problems, "invalid_request_error", param=param or None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


@api.exception_handler(Exception)
async def _internal(_: Request, exc: Exception):
    log.exception("request failed")  # the trace goes to the replica log, never to the client
    return error_response(500, "internal error; see the replica log", "server_error")


@serve.deployment
@serve.ingress(api)
class LLMServer:
    def __init__(self, args: ServeArgs, generator: DeploymentHandle):
        self.args, self.generator = args, generator
        self.tokens = Tokenizer(args.model_dir, args.trust_remote_code)  # prompt lengths and chat templates
        base, lora = Path(args.model_dir), bool(args.adapters_dir)
        self.adapters = AdapterCatalog(
            args.adapters_dir,
            args.model_name,
            base,
            model_fingerprints(base) if lora else set(),
            self._load,
            args.adapters_scan_s,
        )
        # served from the start, each loaded on a replica by the first request for it
        self.adapters.served = self.adapters.scan()
        self.metrics = api.state.metrics = ServeMetrics()
        self.in_flight = 0
        api.state.limits = (args.max_header_bytes, args.max_body_bytes)
        key = os.environ.get(args.api_key_env)
        # only a digest is kept: the key itself never sits in the Serve config or replica state
        api.state.key_sha256 = args.api_key_sha256 or (hashlib.sha256(key.encode()).hexdigest() if key else None)

    # ---- plumbing shared by every route -------------------------------------------------------
    async def _adapter(self, name: str | None) -> str | None:
        """The model id of the adapter a request's `model` names; None for the base model."""
        self.adapters.refresh_if_stale()
        if name is None or name == self.args.model_name:
            return None
        if (model_id := await self.adapters.model_id(name)) is None:
            raise self._not_found(name)
        return model_id

    def _not_found(self, name: str) -> APIError:
        served = ", ".join(repr(n) for n in (self.args.model_name, *self.adapters.served))
        return APIError(
            404,
            f"model {name!r} does not exist; this server has {served}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    async def _load(self, adapter: Adapter) -> None:
        """Load a new adapter version on a model replica, which Serve then sends its requests to."""
        try:
            await self.generator.options(multiplexed_model_id=adapter.model_id).load.remote()
        except REPLICA_DIED:
            raise
        except Exception as e:  # a replica's error arrives wrapped: report its own message
            raise RuntimeError(str(getattr(e, "cause", None) or e)) from e

    def _on(self, sampling: Sampling, stream: bool = False) -> DeploymentHandle:
        """The model replicas, or those that hold the request's adapter when any do."""
        options = {"multiplexed_model_id": sampling.adapter} if sampling.adapter else {}
        return self.generator.options(stream=stream, **options)

    def _sampling(
        self, prompt: Prompt, max_tokens: int | None, temperature: float, top_p: float, stop: list[str], **more
    ) -> Sampling:
        """`more`: seed, presence_penalty, frequency_penalty, logprobs (OpenAI routes)."""
        if (token := self.tokens.unknown_token(prompt)) is not None:
            raise APIError(
                400,
                f"prompt token id {token} is not in the model's vocabulary of {len(self.tokens.tokenizer)}",
                param="prompt",
            )
        n_prompt = self.tokens.count_tokens(prompt)
        if n_prompt > self.args.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt has {n_prompt} tokens; the limit is {self.args.max_prompt_tokens}",
                code="context_length_exceeded",
                param="prompt",
            )
        if max_tokens is not None and max_tokens > self.args.max_new_tokens:
            raise APIError(
                400,
                f"max tokens {max_tokens} is over this server's limit of {self.args.max_new_tokens}",
                param="max_tokens",
            )
        return Sampling(
            max_tokens or min(16, self.args.max_new_tokens),
            temperature if temperature >= MIN_TEMPERATURE else 0.0,
            top_p,
            tuple(stop),
            **more,
        )

    async def _admit(self, handler):
        """Queue limit (429) and timeout (408) around one request's work."""
        if self.in_flight >= self.args.max_queue:
            return APIError(
                429,
                f"server busy: {self.in_flight} requests queued (limit {self.args.max_queue}); retry later",
                "rate_limit_error",
                "queue_full",
            ).response()
        self.in_flight += 1
        self.metrics.queue.set(self.in_flight)
        try:
            return await asyncio.wait_for(handler(), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            return APIError(408, f"request took longer than {self.args.request_timeout_s:.0f}s", "timeout").response()
        except APIError as e:
            return e.response()
        finally:
            self.in_flight -= 1
            self.metrics.queue.set(self.in_flight)

    # ---- generation on the model replicas --------------------------------------------------------
    def _replica_died(self, attempt: int, error: Exception) -> None:
        if attempt == RETRIES:
            raise APIError(
                503, "the model replicas are restarting; retry shortly", "server_error", "replica_unavailable"
            ) from error
        self.metrics.retries.inc()
        log.warning("a model replica died under a request (%s); retrying on another", type(error).__name__)

    async def _complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        for attempt in range(RETRIES + 1):
            try:
                c = await self._on(sampling).complete.remote(prompt, sampling)
                break
            except REPLICA_DIED as e:
                self._replica_died(attempt, e)
        self.metrics.tokens.labels("prompt").inc(c.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(c.completion_tokens)
        return c

    async def _pieces(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[str]:
        """A stream is retried only until its first piece: after that the client already has text."""
        for attempt in range(RETRIES + 1):
            started = False
            try:
                async for piece in self._on(sampling, stream=True).stream.remote(prompt, sampling):
                    started = True
                    yield piece
                return
            except REPLICA_DIED as e:
                if started:
                    raise
                self._replica_died(attempt, e)

    async def _sse(
        self, model: str, prompt: Prompt, sampling: Sampling, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        writer, cutter, first = ChunkWriter(model, chat), StopCutter(sampling.stop), True
        async for piece in self._pieces(prompt, sampling):
            if text := cutter.feed(piece):
                yield writer.piece(text, first=first)
                first = False
            if cutter.stopped:
                break
        if text := cutter.flush():
            yield writer.piece(text, first=first)
            first = False
        n_prompt, n_out = self.tokens.count_tokens(prompt), self.tokens.count_tokens(cutter.text)
        reason = "stop" if cutter.stopped or n_out < sampling.max_new_tokens else "length"
        yield writer.piece("", first=first, finish_reason=reason)
        if include_usage:
            yield writer.usage(n_prompt, n_out)
        yield writer.done()
        self.metrics.tokens.labels("prompt").inc(n_prompt)
        self.metrics.tokens.labels("completion").inc(n_out)

    async def _openai(self, prompt: Prompt, req, max_tokens: int | None, chat: bool):
        sampling = self._sampling(
            prompt,
            max_tokens,
            req.temperature,
            req.top_p,
            req.stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=req.logprob_alternatives(),
            echo=getattr(req, "echo", False),  # completions only
            adapter=await self._adapter(req.model),
        )
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = self._sse(req.model, prompt, sampling, chat, include)
            return StreamingResponse(events, media_type="text/event-stream")
        # n choices sample apart: a seeded request gives choice i the seed + i
        choices = await asyncio.gather(
            *(
                self._complete(prompt, sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i))
                for i in range(req.n)
            )
        )
        # usage counts the returned text as a stream of it would be counted
        completion_tokens = sum(self.tokens.count_tokens(c.text) for c in choices)
        n_prompt, echo = self.tokens.count_tokens(prompt), self.tokens.prompt_text(prompt) if sampling.echo else None
        return completion_body(req.model, choices, chat, n_prompt, completion_tokens, echo)

    # ---- routes ---------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/metrics")
    async def metrics_text(self):
        model_replica = await self.generator.metrics.remote()  # one replica's batch sizes
        return Response(self.metrics.render() + model_replica, media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self) -> dict:
        """The base model, then its adapters; `parent` names an adapter's base, as vLLM lists LoRA models."""
        self.adapters.refresh_if_stale()
        base = {"id": self.args.model_name, "object": "model", "created": 0, "owned_by": "llm-pipeline"}
        adapters = [{**base, "id": name, "parent": base["id"]} for name in self.adapters.served]
        return {"object": "list", "data": [base, *adapters]}

    @api.post("/v1/adapters/reload")
    async def reload_adapters(self) -> dict:
        """Look at the adapters folder now: new and rewritten adapters are served once loaded (a rewritten
        one answers with its old version until then), removed ones no more. Says what changed and why an
        adapter was refused."""
        return await self._adapters_dir_or_400(self.adapters.sync)

    @api.delete("/v1/adapters/{name}")
    async def delete_adapter(self, name: str) -> dict:
        """Stop serving an adapter: its folder moves to <adapters_dir>/.withdrawn/, from where moving it back
        (and a reload) serves it again."""

        async def withdrawn():
            if name == self.args.model_name:
                raise APIError(400, f"{name!r} is the base model; DELETE takes adapters off the server", param="name")
            if await self.adapters.model_id(name) is None:
                raise self._not_found(name)
            moved = withdraw(self.args.adapters_dir, name)
            return {"deleted": name, "moved_to": str(moved), **await self.adapters.sync()}

        return await self._adapters_dir_or_400(withdrawn)

    async def _adapters_dir_or_400(self, action) -> dict:
        if not self.args.adapters_dir:
            raise APIError(400, "this server was started without an adapters folder (serve args: adapters_dir)")
        return await action()

    @api.post("/generate")
    async def generate(self, req: GenerateRequest):
        async def handle():
            adapter = await self._adapter(req.model)
            s = self._sampling(req.prompt, req.max_new_tokens, req.temperature, req.top_p, req.stop, adapter=adapter)
            c = await self._complete(req.prompt, s)
            return {
                "text": c.text,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "finish_reason": c.finish_reason,
            }

        return await self._admit(handle)

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        async def handle():
            return await self._openai(req.prompt, req, req.max_tokens, chat=False)

        return await self._admit(handle)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest):
        async def handle():
            prompt = self.tokens.apply_chat_template([m.plain() for m in req.messages])
            return await self._openai(prompt, req, req.max_completion_tokens or req.max_tokens, chat=True)

        return await self._admit(handle)


def model_options(args: ServeArgs) -> dict:
    """The model replicas autoscale on ongoing requests."""
    return {
        "autoscaling_config": {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
        },
        # room for the batch that generates and several full ones waiting behind it
        "max_ongoing_requests": max(args.max_queue + 1, args.max_batch_size * 8),
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        **draining(args),
    }


def draining(args: ServeArgs) -> dict:
    """A replica stopped by a scale-down or a redeploy finishes what it holds for as long as a request may
    run: Serve's default, 20 s, killed an ingress replica whose request waited 19 s behind the model's own
    rolling update (tests/faults/test_serve_churn.py, one 500 in 2,000 on a loaded 2-core machine)."""
    return {"graceful_shutdown_timeout_s": args.request_timeout_s}


def ingress_options(args: ServeArgs) -> dict:
    """The ingress only parses, checks and forwards: a tenth of a CPU, as many replicas as the model's
    minimum so that one can die while the others answer."""
    # one more than our own queue limit, so that the ingress (not Serve's router) answers 429
    return {
        "num_replicas": args.min_replicas,
        "max_ongoing_requests": args.max_queue + 1,
        "ray_actor_options": {"num_cpus": 0.1},
        **draining(args),
    }


def build_app(args: dict) -> Application:
    settings = ServeArgs(**args)
    return LLMServer.options(**ingress_options(settings)).bind(
        settings, Generator.options(**model_options(settings)).bind(settings)
    )
