"""The LoRA adapters a server answers with beside its base model: every folder under `adapters_dir`
that holds a peft adapter, named by its folder (runs/<name>/adapters/<adapter>/ by default). A request
picks one with the OpenAI `model` field; the base keeps the server's model name.

The folder is the truth, read again while the server runs (AdapterCatalog): a folder added or rewritten
there is loaded on a model replica and only then served, so an adapter being replaced answers with its
old version until its new one has loaded; a folder removed (or withdrawn by DELETE) stops being served.
Each version of an adapter has its own model id, `name@version`, by which Ray Serve's multiplexing sends
its requests to a replica that holds it (generator.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.loading import check_adapter_base

log = logging.getLogger("pipeline.serve")
BASE = "__base__"  # peft's name for the rows of a mixed batch that no adapter changes
WITHDRAWN = ".withdrawn"  # DELETE moves an adapter's folder in here: taken off the server, not lost
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    version: str  # changes whenever its files are rewritten

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"


def adapter_version(path: Path) -> str:
    """From the files' sizes and modification times: a rewrite changes it, and reading it costs two stats."""
    stats = [(f, s.st_size, s.st_mtime_ns) for f in FILES if (s := _stat(path / f))]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:12]


def _stat(path: Path):
    return path.stat() if path.is_file() else None


def find_adapters(adapters_dir: str | None) -> dict[str, Path]:
    """Adapter name -> folder, sorted by name; {} without a folder to look in (a RayService names the
    run's adapters folder before any adapter is trained into it)."""
    if not adapters_dir:
        return {}
    root = Path(adapters_dir)
    if not root.is_dir():
        log.warning("no adapters folder at %s: serving the base model alone", root)
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}


def check_servable(name: str, path: Path, base_name: str, base_dir: Path, fits: set[str]) -> None:
    """An adapter is served under its folder's name, on the base it was trained on."""
    if name in (base_name, BASE):
        raise ConfigError(f"the adapter in {path} is named like the base model ({name!r}): rename its folder")
    check_adapter_base(path, base_dir, fits)


def check_lora_rank(path: Path, max_rank: int) -> None:
    """vLLM sizes its LoRA buffers for `max_lora_rank`; a larger adapter cannot be served."""
    rank = json.loads((path / "adapter_config.json").read_text())["r"]
    if rank > max_rank:
        raise ConfigError(f"the adapter in {path} has LoRA rank {rank}, over serve.max_lora_rank={max_rank}: raise it")


def withdraw(adapters_dir: str, name: str) -> Path:
    """Move an adapter's folder out of the served set, into .withdrawn/<name>-<time>/ beside it."""
    target = Path(adapters_dir) / WITHDRAWN / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6}"
    target.parent.mkdir(exist_ok=True)
    shutil.move(str(Path(adapters_dir) / name), target)
    return target


@dataclass
class AdapterCatalog:
    """What the ingress serves: adapter name -> the version requests go to. `load(adapter)` loads one
    on a model replica and raises when it cannot be served; `fits` are the base's model_fingerprints."""

    adapters_dir: str | None
    base_name: str
    base_dir: Path
    fits: set[str]
    load: Callable[[Adapter], Awaitable[None]]
    every_s: float = 10.0  # how old a look at the folder may get before a request starts another
    served: dict[str, Adapter] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why, from the latest look
    scanned_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _background: asyncio.Task | None = None

    def scan(self) -> dict[str, Adapter]:
        """The folder as it is now, adapters that cannot be served left out (in `refused`, with why)."""
        found, self.refused = {}, {}
        for name, path in find_adapters(self.adapters_dir).items():
            try:
                check_servable(name, path, self.base_name, self.base_dir, self.fits)
            except ConfigError as e:
                self.refused[name] = str(e)
                continue
            found[name] = Adapter(name, path, adapter_version(path))
        self.scanned_at = time.monotonic()
        return found

    async def sync(self) -> dict:
        """Look at the folder and serve what is there: new and rewritten adapters once they have loaded
        (a rewritten one that fails keeps its old version), removed ones no more. Returns what changed."""
        async with self._lock:
            now = self.scan()
            added = [n for n in now if n not in self.served]
            replaced = [n for n in now if n in self.served and now[n] != self.served[n]]
            removed = [n for n in self.served if n not in now]
            for name in added + replaced:
                try:
                    await self.load(now[name])
                except Exception as e:  # noqa: BLE001 - the reason is reported; the others still load
                    self.refused[name] = str(e)
                    log.warning("adapter %s not served: %s", name, e)
                    if name in self.served:
                        now[name] = self.served[name]
                    else:
                        del now[name]
            self.served = dict(sorted(now.items()))
            done = {"added": added, "replaced": replaced, "removed": removed}
            report = {k: [n for n in v if n not in self.refused] for k, v in done.items()}
            if any(report.values()):
                log.info("adapters: %s", report)
            return {**report, "refused": dict(self.refused), "served": list(self.served)}

    def refresh_if_stale(self) -> None:
        """Start a look at the folder in the background when the last one is older than `every_s`;
        the request that notices goes on with what is served now."""
        stale = self.every_s and time.monotonic() - self.scanned_at > self.every_s
        if self.adapters_dir and stale and not (self._background and not self._background.done()):
            self._background = asyncio.get_running_loop().create_task(self.sync())

    async def model_id(self, name: str) -> str | None:
        """The model id a request for `name` goes to; None when no adapter has that name even after
        looking at the folder again (it may have just arrived)."""
        if name not in self.served and self.adapters_dir and time.monotonic() - self.scanned_at > 1.0:
            await self.sync()  # at most once a second: a flood of unknown names must not flood the disk
        return self.served[name].model_id if name in self.served else None
