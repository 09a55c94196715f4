"""The console's web app: server-rendered pages (Jinja2) with a little JavaScript for live updates and
the playground's stream. Curves are SVG drawn by pipeline.plots, in the style of the PNGs the stages write.

Pages: /  runs | /runs/<name>  stages and config | /runs/<name>/data | /runs/<name>/training |
/runs/<name>/export | /playground | /launch, /jobs/<id>. JSON under /api/."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, Field

from pipeline.console import runs
from pipeline.console.launch import COMMANDS, Launcher
from pipeline.plots import plot_training

KEY_COOKIE = "pipeline_console_key"
# where the app is mounted: "" standalone, the route prefix under Ray Serve; every link and fetch starts with it
ROOT: ContextVar[str] = ContextVar("root", default="")
FILES = {"histograms.png": "curate/histograms.png"}  # the files a page shows as they are


def sha256(key: str | None) -> str | None:
    return hashlib.sha256(key.encode()).hexdigest() if key else None


@dataclass
class Settings:
    runs_dir: Path
    endpoint: str  # the served model's base URL, for the playground
    api_key_sha256: str | None = None  # the key's hash: the key is required of every request (beyond 127.0.0.1)
    ray_jobs: bool = False  # launch as Ray jobs (on ray_address, or the cluster this runs on); else processes
    ray_address: str | None = None
    default_config: str = "configs/demo.yaml"


class ChatRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=20_000)
    model: str | None = None
    max_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


class Pages:
    """The templates, rendered with what every page needs (where the app is mounted, the endpoint)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.env = Environment(loader=PackageLoader("pipeline.console"), autoescape=select_autoescape())
        self.env.filters["when"] = _when
        self.env.filters["yaml"] = lambda value: yaml.safe_dump(value, sort_keys=False)

    def __call__(self, name: str, **context) -> HTMLResponse:
        html = self.env.get_template(name).render(endpoint=self.settings.endpoint, root=ROOT.get(), **context)
        return HTMLResponse(html)


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(ROOT.get() + path, status_code=303)


def make_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="llm-pipeline console", docs_url=None, redoc_url=None)
    pages = Pages(settings)
    add_key_check(app, settings.api_key_sha256)
    app.include_router(run_pages(settings, pages))
    app.include_router(playground(settings, pages))
    app.include_router(launch_pages(settings, pages))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):  # a message, never a stack trace
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    return app


def add_key_check(app: FastAPI, key_sha256: str | None) -> None:
    """With a key, every request shows it: a Bearer header, or the cookie /login?key=... sets."""

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        root = request.scope.get("root_path", "").rstrip("/")
        ROOT.set(root)
        if key_sha256 is None or request.url.path.removeprefix(root) == "/login":
            return await call_next(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token if scheme.lower() == "bearer" else request.cookies.get(KEY_COOKIE, "")
        if hmac.compare_digest(sha256(presented) or "", key_sha256):
            return await call_next(request)
        return JSONResponse({"error": "this console needs the API key: open /login?key=KEY once"}, status_code=401)

    @app.get("/login")
    def login(key: str):
        if key_sha256 and not hmac.compare_digest(sha256(key) or "", key_sha256):
            raise HTTPException(401, "wrong key")
        response = redirect("/")
        response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict")
        return response


def run_pages(settings: Settings, page: Pages) -> APIRouter:
    """Runs, and each run's stages, data, training and export pages."""
    router = APIRouter()

    def run_folder(name: str) -> Path:
        folder = settings.runs_dir / name
        if "/" in name or name.startswith(".") or not folder.is_dir():
            raise HTTPException(404, f"no run named {name!r} under {settings.runs_dir}")
        return folder

    # ---- runs -----------------------------------------------------------------------------------
    @router.get("/", response_class=HTMLResponse)
    def runs_page():
        return page("runs.html", runs=runs.list_runs(settings.runs_dir), runs_dir=settings.runs_dir)

    @router.get("/fragments/runs", response_class=HTMLResponse)
    def runs_table():
        return page("runs_table.html", runs=runs.list_runs(settings.runs_dir))

    @router.get("/api/runs")
    def runs_json() -> list[dict]:
        return [
            {"name": r.name, "status": r.status, "reason": r.reason, "stages": [s.__dict__ for s in r.stages]}
            for r in runs.list_runs(settings.runs_dir)
        ]

    @router.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str):
        return page("run.html", run=runs.read_run(run_folder(name)))

    @router.get("/runs/{name}/file/{file}")
    def run_file(name: str, file: str):
        if file not in FILES or not (path := run_folder(name) / FILES[file]).is_file():
            raise HTTPException(404, f"run {name!r} has no {file}")
        return FileResponse(path)

    # ---- data -----------------------------------------------------------------------------------
    @router.get("/runs/{name}/data", response_class=HTMLResponse)
    def data_page(name: str, which: str = "rejected", reason: str = "", offset: int = 0):
        if which not in ("kept", "rejected"):
            raise HTTPException(400, "which is kept or rejected")
        folder = run_folder(name)
        docs, total = runs.documents(folder, which, reason, max(offset, 0))
        stats = runs.curate_stats(folder)
        return page(
            "data.html", run=name, stats=stats, docs=docs, total=total, which=which, reason=reason, offset=offset
        )

    @router.get("/runs/{name}/data/{which}/{doc_id:path}", response_class=HTMLResponse)
    def document_page(name: str, which: str, doc_id: str):
        folder = run_folder(name)
        doc = runs.document(folder, which, doc_id)
        if doc is None:
            raise HTTPException(404, f"no {which} document {doc_id!r} in run {name!r}")
        survivor = runs.document(folder, "kept", doc["duplicate_of"]) if doc.get("duplicate_of") else None
        diff = runs.marked_diff(survivor["text"], doc["text"]) if survivor else None
        return page("document.html", run=name, doc=doc, survivor=survivor, diff=diff)

    # ---- training, export -----------------------------------------------------------------------
    @router.get("/runs/{name}/training", response_class=HTMLResponse)
    def training_page(name: str):
        folder = run_folder(name)
        histories, stopped_at = runs.training_histories(folder)
        curves = plot_training(histories, stopped_at) if any(histories.values()) else None
        return page(
            "training.html",
            run=runs.read_run(folder),
            curves=curves,
            summary=runs.training_summary(folder),
            stopped_at=stopped_at,
        )

    @router.get("/runs/{name}/export", response_class=HTMLResponse)
    def export_page(name: str):
        folder = run_folder(name)
        return page(
            "export.html",
            run=name,
            quant=runs.quant_report(folder),
            evals=runs.eval_report(folder),
            adapters=runs.adapters(folder),
        )

    return router


def playground(settings: Settings, page: Pages) -> APIRouter:
    """The chat page, and the endpoint's models and chat stream passed through (the key stays here)."""
    router = APIRouter()

    def endpoint_headers() -> dict:
        key = os.environ.get("PIPELINE_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    @router.get("/playground", response_class=HTMLResponse)
    def playground():
        return page("playground.html")

    @router.get("/api/models")
    def models() -> dict:
        try:
            reply = requests.get(f"{settings.endpoint}/v1/models", headers=endpoint_headers(), timeout=10)
        except requests.RequestException as e:
            raise HTTPException(502, f"the endpoint {settings.endpoint} does not answer: {e}") from None
        if not reply.ok:
            raise HTTPException(502, f"the endpoint answered {reply.status_code}: {reply.text[:200]}")
        return reply.json()

    @router.post("/api/chat")
    def chat(req: ChatRequest):
        """The endpoint's OpenAI chat stream, passed through as it comes (server-sent events)."""
        body = {
            "model": req.model or "",
            "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not body["model"]:
            body["model"] = models()["data"][0]["id"]
        try:
            reply = requests.post(
                f"{settings.endpoint}/v1/chat/completions",
                json=body,
                headers=endpoint_headers(),
                stream=True,
                timeout=300,
            )
        except requests.RequestException as e:
            raise HTTPException(502, f"the endpoint {settings.endpoint} does not answer: {e}") from None
        if not reply.ok:
            raise HTTPException(reply.status_code if reply.status_code < 500 else 502, reply.text[:500])
        return StreamingResponse(reply.iter_content(chunk_size=None), media_type="text/event-stream")

    return router


def launch_pages(settings: Settings, page: Pages) -> APIRouter:
    """Start a stage or a run, follow its log, stop it."""
    router = APIRouter()
    launcher = Launcher(settings.runs_dir.resolve(), settings.ray_jobs, settings.ray_address)

    @router.get("/launch", response_class=HTMLResponse)
    def launch_page():
        jobs = [(job, launcher.status(job)) for job in reversed(launcher.jobs.values())]
        return page(
            "launch.html",
            commands=list(COMMANDS),
            jobs=jobs,
            config=settings.default_config,
            where=(settings.ray_address or "this Ray cluster") if settings.ray_jobs else "local processes",
        )

    @router.post("/launch")
    def launch(command: str = Form(...), config: str = Form(...), overrides: str = Form("")):
        try:
            job = launcher.start(command, config, overrides.split())
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return redirect(f"/jobs/{job.id}")

    def job_or_404(job_id: str):
        if job_id not in launcher.jobs:
            raise HTTPException(404, f"no job {job_id!r} started by this console")
        return launcher.jobs[job_id]

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: str):
        job = job_or_404(job_id)
        return page("job.html", job=job, status=launcher.status(job))

    @router.get("/api/jobs/{job_id}")
    def job_json(job_id: str) -> dict:
        job = job_or_404(job_id)
        return {"id": job.id, "status": launcher.status(job), "logs": launcher.logs(job)[-20_000:]}

    @router.post("/jobs/{job_id}/stop")
    def stop(job_id: str):
        launcher.stop(job_or_404(job_id))
        return redirect(f"/jobs/{job_id}")

    return router
