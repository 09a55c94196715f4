"""Shared fixtures: one local Ray for the whole session, a small real corpus, a tiny config, and
Ray-free fixtures (a tiny model directory) for the unit lane.

Two lanes: tests marked `integration` start Ray (and usually the tiny pipeline run); the rest are
unit tests of pure functions that run without Ray in seconds (`make test-fast`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from pipeline.config import PipelineConfig, load_config
from pipeline.sample_data import build_corpus

REPO = Path(__file__).resolve().parents[1]
# Ray Train's controller looks at its workers every 2 s by default: each tiny run then waits for a poll at
# start and at the end; the suite runs dozens of them
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
TINY = REPO / "configs" / "tiny.yaml"


def build_lock_holder(lock: Path, env: dict | None = None) -> subprocess.Popen:
    """A process that holds torch's JIT build lock `lock` as a loader does (torch's FileBaton), returned once
    it holds it; kill it to leave the lock as a loader killed mid-load does."""
    code = (
        "import sys, time; from torch.utils.file_baton import FileBaton; assert FileBaton(sys.argv[1]).try_acquire(); "
        "print('holding', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A test that starts Ray belongs to the integration lane: say so rather than slow the fast lane down."""
    running = ray.is_initialized()
    yield
    if not running and request.node.get_closest_marker("integration") is None:
        assert not ray.is_initialized(), f"{request.node.nodeid} started Ray: mark it @pytest.mark.integration"


@pytest.fixture(autouse=True)
def _torch_default_dtype_is_left_alone(request):
    """torch's default dtype is one per process: a test that leaves it 16-bit makes the tests after it build
    16-bit models (this once failed two training tests an hour later). Fail the test that changed it."""
    import torch

    yield
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    assert dtype == torch.float32, f"{request.node.nodeid} left torch's default dtype at {dtype}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny-moe preset (random weights) on a BPE tokenizer trained on a little licence text, as the
    train stage builds it, without Ray or a corpus run: for tests that need a model directory's config,
    tokenizer or module names."""
    from transformers import AutoModelForCausalLM

    from pipeline.model import PRESETS, train_tokenizer
    from pipeline.sample_data import source_files, split_documents

    texts = [doc for path in source_files()[:40] for doc in split_documents(path.read_text(errors="replace"))]
    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer(texts, 512)
    AutoModelForCausalLM.from_config(PRESETS["tiny-moe"](len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lora_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA adapter on `base` whose B matrices are random instead of zero, so that it changes the
    answers; its record names its base, as training's does. Scaled up (alpha/r = 16): a tiny model's greedy
    answer is often a loop of one token, which an adapter at the usual scale (2) did not always move, and
    the tiny run's weights vary between test sessions (it trains in the order Ray Data wrote its rows)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.digest import path_digest
    from pipeline.loading import load_model, write_adapter_record

    torch.manual_seed(seed)
    model = load_model(AutoModelForCausalLM, base)
    lora = LoraConfig(r=8, lora_alpha=128, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    write_adapter_record(out, base, path_digest(base))
    return out


@pytest.fixture(scope="session")
def ray_local():
    from pipeline.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


# Records whose fate is known: they are appended to the real corpus sample.
PLANTED = [
    {"id": "planted-short", "text": "too few words"},
    {"id": "planted-empty", "text": "   "},
    {"id": "planted-notext", "body": "no text field here"},
]


def passes_filters(text: str) -> bool:
    from pipeline.config import FiltersConfig
    from pipeline.curate.filters import build_filters

    return len(text.split()) > 60 and not any(f(text) for f in build_filters(FiltersConfig()))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~400 KB of real licence text (with its natural duplicates) plus planted bad records."""
    root = tmp_path_factory.mktemp("corpus")
    files = build_corpus(root, max_bytes=400_000, shards=2)
    with files[0].open("a") as fh:
        for rec in PLANTED:
            fh.write(json.dumps(rec) + "\n")
        fh.write('{"id": "planted-bad-json", "text": \n')
        first = next(doc for doc in map(json.loads, files[1].read_text().splitlines()) if passes_filters(doc["text"]))
        fh.write(json.dumps({"id": "planted-exact-copy", "text": first["text"]}) + "\n")
        words = first["text"].split()
        near = " ".join(words[:-1] + ["CHANGED"]) if len(words) > 60 else first["text"] + " extra"
        fh.write(json.dumps({"id": "planted-near-copy", "text": near}) + "\n")
    with files[1].open("ab") as fh:
        fh.write(b'{"id": "planted-bad-utf8", "text": "caf\xe9"}\n')
    return root


def tiny_config(tmp: Path, corpus: Path, *overrides: str) -> PipelineConfig:
    return load_config(
        TINY, [f"runs_dir={tmp}", f"data.input=[{corpus}/*.jsonl]", f"serve.port={free_port()}", *overrides]
    )


@pytest.fixture(scope="session")
def tiny_run(ray_local, tiny_corpus, tmp_path_factory) -> PipelineConfig:
    """curate -> train -> quantize once on the tiny corpus; stage tests assert on the outputs."""
    from pipeline.curate.stage import run_curate
    from pipeline.export.stage import run_quantize
    from pipeline.train.stage import run_train

    cfg = tiny_config(tmp_path_factory.mktemp("runs"), tiny_corpus)
    run_curate(cfg)
    run_train(cfg)
    run_quantize(cfg)
    return cfg


def derived_config(base: PipelineConfig, tmp: Path, *overrides: str) -> PipelineConfig:
    """The tiny config with overrides, writing under tmp, on `base`'s curated data (copied, not redone)."""
    import shutil

    cfg = tiny_config(tmp, Path(base.data.input[0]).parent, *overrides)
    shutil.copytree(base.stage_dir("curate"), cfg.stage_dir("curate"))
    return cfg


def logged_losses(tensorboard_dir: Path) -> dict[int, float]:
    """The training loss rank 0 logged to TensorBoard so far, by step (read while a run goes on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return {}
    events = EventAccumulator(str(tensorboard_dir)).Reload()
    scalars = events.Scalars("train/loss") if "train/loss" in events.Tags()["scalars"] else []
    return {e.step: e.value for e in scalars}


# Ray titles a worker process after the task it runs ("ray::MapBatches(...)"); idle ones are "ray::IDLE"
DATA_TASKS = ("MapBatches", "FlatMap", "ReadFiles", "Map(", "HashAggregate")


def is_data_task(title: str) -> bool:
    """A process title (its cmdline) that is a Ray Data task at work."""
    return title.startswith("ray::") and any(task in title for task in DATA_TASKS)


def curate_outcome(curate_dir: Path) -> Counter:
    """A curate run's kept (id, text) rows and its rejected (id, reason) rows, counted: equal for equal runs."""
    import pandas as pd

    kept = pd.read_parquet(curate_dir / "kept", columns=["id", "text"])
    rejected = pd.read_parquet(curate_dir / "rejected", columns=["id", "reason"])
    return Counter(("kept", *row) for row in kept.itertuples(index=False)) + Counter(
        ("rejected", *row) for row in rejected.itertuples(index=False)
    )


def outcome_difference(disturbed: Path, undisturbed: Path) -> dict[str, list]:
    """The rows one curate run has and the other lacks ({} when the runs agree), text cut short: a failing
    comparison names the rows that differ instead of printing both runs whole."""
    left, right = curate_outcome(disturbed), curate_outcome(undisturbed)
    differences = {"only disturbed": left - right, "only undisturbed": right - left}
    return {
        side: sorted((kind, doc, value[:60]) for kind, doc, value in rows.elements())
        for side, rows in differences.items()
        if rows
    }


def timed_generate(url: str, i: int, session=None) -> tuple[float, float, int | str]:
    """One small /generate request (prompt number `i`): when it started, how long it took, and its
    status, or the name of the client's error when no answer came."""
    import requests

    start = time.time()
    try:
        body = {"prompt": f"Permission {i}", "max_new_tokens": 4}
        status = (session or requests).post(f"{url}/generate", json=body, timeout=120).status_code
    except requests.RequestException as e:
        status = type(e).__name__
    return start, time.time() - start, status


def tiny_curate(runs_dir: Path, corpus: Path) -> subprocess.CompletedProcess:
    """`pipeline curate` on the tiny config as a user runs it: its own process, output captured."""
    command = [sys.executable, "-m", "pipeline.cli", "curate", "--config", str(TINY), f"runs_dir={runs_dir}"]
    return subprocess.run(
        [*command, f"data.input=[{corpus}/*.jsonl]"], capture_output=True, text=True, cwd=REPO, timeout=300
    )


GERMAN = (
    "Die Katze sitzt am Morgen auf dem warmen Dach und schaut lange in den Garten hinunter. Im Sommer "
    "bl\u00fchen dort die Rosen, und die Nachbarn trinken am Abend gemeinsam Kaffee unter dem alten Baum. "
    "Wenn es regnet, bleibt die Katze lieber im Haus und schl\u00e4ft neben dem Ofen, bis die Sonne wieder "
    "scheint und die V\u00f6gel zur\u00fcckkommen. Die Kinder gehen dann hinaus und spielen bis zur Dunkelheit."
)


def site_page(paragraphs: list[str], notice: str = "") -> bytes:
    """A web page as sites serve them: scripts and styles, a navigation bar, the article (with an optional
    notice paragraph, as a mirror adds one), a footer of links."""
    import html

    nav = "".join(f'<li><a href="/{w.lower()}">{w}</a></li>' for w in ("Home", "News", "Archive", "About", "Contact"))
    body = "".join(f"<p>{html.escape(p)}</p>" for p in ([notice] if notice else []) + paragraphs)
    return (
        "<html><head><title>Site</title><script>var tracker = 'script text';</script>"
        "<style>body { color: red }</style></head><body>"
        f"<header><nav><ul>{nav}</ul></nav></header><main><article>{body}</article></main>"
        '<footer><a href="/imprint">Imprint</a> <a href="/privacy">Privacy</a></footer></body></html>'
    ).encode()


def crawl_responses(articles: int = 6) -> list[tuple[str, str, str, bytes]]:
    """(url, status, content type, body) of a small crawl whose fate is known: `articles` English pages of
    licence prose, the first of them again on a mirror with a notice of its own (a near duplicate), a German
    page, a page with no article, an image and a 404."""
    from pipeline.sample_data import DOC_ROOTS, split_documents

    licences = sorted(p for p in Path(DOC_ROOTS[1]).glob("*") if p.is_file())
    docs = [d for p in licences for d in split_documents(p.read_text(errors="replace"))]
    docs = [d for d in docs if passes_filters(d)][:articles]
    site = "http://site.example"
    pages = [(f"{site}/a{i}.html", site_page(d.split("\n\n"))) for i, d in enumerate(docs)]
    pages += [
        ("http://mirror.example/a0.html", site_page(docs[0].split("\n\n"), "Mirrored from site.example, kept here.")),
        (f"{site}/de.html", site_page([GERMAN])),
        (f"{site}/empty.html", site_page([])),
    ]
    return [(url, "200 OK", "text/html; charset=utf-8", body) for url, body in pages] + [
        (f"{site}/logo.png", "200 OK", "image/png", b"\x89PNG\r\n\x1a\nnot really an image"),
        (f"{site}/gone.html", "404 Not Found", "text/html", b"<html><body>Not found</body></html>"),
    ]


PEOPLE = (
    "name,year,field\nAda Lovelace,1815,mathematics\nAlan Turing,1912,computing\nGrace Hopper,,compilers\nbroken,line\n"
)


WIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename><dbname>testwiki</dbname>
    <namespaces><namespace key="0" case="first-letter" /><namespace key="1">Talk</namespace>
      <namespace key="10">Template</namespace></namespaces>
  </siteinfo>
  <page><title>Ada Lovelace</title><ns>0</ns><id>7</id>
    <revision><id>70</id><timestamp>2026-01-02T03:04:05Z</timestamp><text xml:space="preserve">{{Infobox person
| name = Ada | birth_date = {{birth date|1815|12|10}} }}
'''Ada Lovelace''' was an [[England|English]] mathematician.&lt;ref&gt;{{cite book|title=Notes}}&lt;/ref&gt; She wrote
about the [[Analytical Engine]].&lt;!-- a comment --&gt;

== Life ==
{| class="wikitable"
|-
| cell one || cell two
|}
[[File:Ada.jpg|thumb|A portrait]]
She was born in [[London]].
[[Category:Mathematicians]]
[[de:Ada Lovelace]]</text></revision></page>
  <page><title>Lovelace</title><ns>0</ns><id>8</id><redirect title="Ada Lovelace" />
    <revision><id>80</id><text xml:space="preserve">#REDIRECT [[Ada Lovelace]]</text></revision></page>
  <page><title>Talk:Ada Lovelace</title><ns>1</ns><id>9</id>
    <revision><id>90</id><text xml:space="preserve">A question about the article.</text></revision></page>
  <page><title>Template:Stub</title><ns>10</ns><id>10</id>
    <revision><id>100</id><text xml:space="preserve">{{ambox|text=stub}}</text></revision></page>
  <page><title>Only a template</title><ns>0</ns><id>11</id>
    <revision><id>110</id><text xml:space="preserve">{{Infobox|x=1}}</text></revision></page>
</mediawiki>
"""
