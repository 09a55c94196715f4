"""The Ray Serve application: a FastAPI ingress in front of a generation engine.

Run it with `pipeline serve --config FILE`, or `serve run serve.app:build_app model_dir=DIR`,
or from a RayService's serveConfigV2 (import_path: serve.app:build_app, args: ServeArgs).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from pipeline.serving.engine import PromptTooLong, load_engine
from pipeline.serving.schemas import GenerateRequest, GenerateResponse, ServeArgs

log = logging.getLogger("pipeline.serve")
api = FastAPI(title="llm-pipeline", description="Generation from the model the pipeline trained.")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return _error(422 if "json_invalid" not in str(exc.errors()) else 400, problems, "invalid_request_error")


@api.exception_handler(PromptTooLong)
async def _prompt_too_long(_: Request, exc: PromptTooLong) -> JSONResponse:
    return _error(400, str(exc), "invalid_request_error")


@api.exception_handler(Exception)
async def _internal(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")  # the trace goes to the replica log, never to the client
    return _error(500, "internal error; see the replica log", "server_error")


@serve.deployment
@serve.ingress(api)
class LLMServer:
    def __init__(self, args: ServeArgs):
        self.args = args
        self.engine = load_engine(args.model_dir, args.engine)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.args.model_name}

    @api.post("/generate", response_model=GenerateResponse)
    def generate(self, req: GenerateRequest) -> GenerateResponse:
        n_prompt = self.engine.count_tokens(req.prompt)
        if n_prompt > self.args.max_prompt_tokens:
            raise PromptTooLong(f"prompt has {n_prompt} tokens; the limit is {self.args.max_prompt_tokens}")
        max_new = min(req.max_new_tokens, self.args.max_new_tokens)
        c = self.engine.generate(req.prompt, max_new, req.temperature, req.top_p, req.stop)
        return GenerateResponse(text=c.text, prompt_tokens=c.prompt_tokens,
                                completion_tokens=c.completion_tokens, finish_reason=c.finish_reason)


def build_app(args: dict) -> Application:
    s = ServeArgs(**args)
    return LLMServer.options(
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(s)
