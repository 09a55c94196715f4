"""The console in a real headless Chromium (Debian's, driven by Playwright) over a real tiny run and its
endpoint on Ray Serve: every page a user opens, the playground streaming an answer, and a curate launched
from the page that finishes and shows up under Runs. With CONSOLE_SCREENSHOTS=docs/console the pages'
screenshots are written there (`make console-screenshots`)."""

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
import uvicorn
from ray import serve

from conftest import TINY, free_port
from pipeline.console.app import Settings, make_app
from pipeline.serving.deploy import deploy

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# a closed network: Chromium's background fetches would only fail, many at a time
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def endpoint(tiny_run):
    url = deploy(tiny_run)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def console(tiny_run, endpoint):
    """`pipeline console` over the tiny run's runs folder, in a thread of this process."""
    runs_dir = Path(tiny_run.runs_dir)
    server = uvicorn.Server(
        uvicorn.Config(make_app(Settings(runs_dir, endpoint)), port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "the console tests need Debian's chromium: `make test` installs it (apt)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page(viewport={"width": 1200, "height": 820})
        browser.close()


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


def test_the_runs_page_lists_the_finished_tiny_run(console, page, tiny_run, tmp_path):
    page.goto(console)
    row = page.locator(f'tr[data-run="{tiny_run.name}"]')
    assert row.locator(".status").first.inner_text() == "done"
    assert [s.strip() for s in row.locator("td").nth(4).inner_text().split()] == ["curate", "train", "quantize"]
    screenshot(page, "runs", tmp_path)


def test_a_running_stage_updates_on_the_runs_page_without_a_reload(console, page, tiny_run):
    """A run whose command is this test's process (alive, so running) at training step 3; the journal
    and progress then move on as a run's would, and the open page follows."""
    from pipeline import journal

    cfg = tiny_run.model_copy(update={"name": "live"})
    journal.command_started(cfg, "train", ["train"])
    journal.record(cfg, "stage", stage="train")
    progress = Path(tiny_run.runs_dir) / "live" / "train" / "sft" / "progress.json"
    progress.parent.mkdir(parents=True)
    progress.write_text('{"step": 3, "loss": 4.25}')
    page.goto(console)
    row = page.locator('tr[data-run="live"]')
    assert row.locator(".status").first.inner_text() == "running"
    assert "sft: step 3, loss 4.250" in row.inner_text()
    progress.write_text('{"step": 9, "loss": 3.5}')
    page.wait_for_function("document.querySelector('tr[data-run=live]').innerText.includes('step 9')", timeout=10_000)
    journal.record(cfg, "stage_done", stage="train", seconds=42.0)
    journal.record(cfg, "end", status="done")
    page.wait_for_function("document.querySelector('tr[data-run=live] .status').innerText === 'done'", timeout=10_000)
    assert "train 42 s" in page.locator('tr[data-run="live"]').inner_text()


def test_the_data_page_shows_a_rejected_document_and_its_reason(console, page, tiny_run, tmp_path):
    page.goto(f"{console}/runs/{tiny_run.name}/data")
    page.get_by_role("link", name="too short (< 5 words)").click()
    rows = page.locator("#documents tr").filter(has=page.locator("td"))
    assert any("planted-short" in row for row in rows.all_inner_texts())
    assert set(rows.locator("td.reason").all_inner_texts()) == {"too short (< 5 words)"}
    screenshot(page, "data", tmp_path)
    page.goto(f"{console}/runs/{tiny_run.name}/data/rejected/planted-near-copy")
    assert page.locator("#diff ins").first.inner_text().strip() == "CHANGED"  # the planted word, marked
    screenshot(page, "near-duplicate", tmp_path)


def test_the_training_page_draws_the_loss_curve(console, page, tiny_run, tmp_path):
    page.goto(f"{console}/runs/{tiny_run.name}/training")
    svg = page.locator("#curves svg")
    assert svg.count() == 1 and svg.bounding_box()["height"] > 200
    # matplotlib draws each line as a path: the loss panel's line has a point per logged step
    assert page.locator("#curves svg path").count() > 10
    assert "loss" in page.locator("#curves").inner_text()
    screenshot(page, "training", tmp_path)
    page.goto(f"{console}/runs/{tiny_run.name}/export")
    assert "passed" in page.locator("body").inner_text() or "failed" in page.locator("body").inner_text()
    screenshot(page, "export", tmp_path)


def test_the_playground_streams_an_answer_from_the_served_model(console, page, tmp_path):
    page.goto(f"{console}/playground")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#prompt", "Permission is hereby granted")
    page.fill("#max_tokens", "12")
    page.fill("#temperature", "0")  # greedy: the same answer every run (sampled, it may stop at its first token)
    lengths = []
    page.expose_function("seen", lambda n: lengths.append(n))
    # record the answer's length at every change: a stream grows it piece by piece
    page.evaluate(
        "new MutationObserver(() => seen(document.querySelector('#answer').textContent.length))"
        ".observe(document.querySelector('#answer'), {childList: true, characterData: true, subtree: true})"
    )
    page.click("#send")
    page.wait_for_selector("#figures[data-done]", timeout=120_000)
    figures = page.locator("#figures").inner_text()
    assert re.search(r"\d+ tokens; first token \d+ ms, whole answer \d+ ms", figures), figures
    answer = page.locator("#answer").text_content()  # the tiny model's greedy answer may be all line breaks
    print(f"\nplayground answer {answer!r}, its length as it grew {lengths}; {figures}")
    assert answer and len([n for n in lengths if n > 0]) > 1, lengths  # more than one piece arrived
    screenshot(page, "playground", tmp_path)


def test_a_curate_launched_from_the_page_finishes_and_appears_in_runs(console, page, tiny_corpus, tmp_path):
    page.goto(f"{console}/launch")
    page.select_option("select[name=command]", "curate")
    page.fill("input[name=config]", str(TINY))
    page.fill("input[name=overrides]", f"name=launched data.input=[{tiny_corpus}/*.jsonl]")
    page.click("#launch button")
    page.wait_for_url(re.compile(r".*/jobs/curate-\w+"))
    page.wait_for_function("document.querySelector('#status').textContent !== 'RUNNING'", timeout=300_000)
    logs = page.locator("#logs").inner_text()
    assert page.locator("#status").inner_text() == "SUCCEEDED", logs
    assert "curate:" in logs and "kept" in logs
    screenshot(page, "launch", tmp_path)
    page.goto(console)
    row = page.locator('tr[data-run="launched"]')
    assert row.locator(".status").first.inner_text() == "done"
    assert re.fullmatch(r"curate \d+ s", row.locator("td").nth(4).inner_text().strip())
    assert row.locator("td").nth(2).inner_text() == "curate"


def test_a_launched_stage_stopped_from_its_page_ends_as_interrupted(console, page, tiny_corpus):
    page.goto(f"{console}/launch")
    page.select_option("select[name=command]", "curate")
    page.fill("input[name=config]", str(TINY))
    page.fill("input[name=overrides]", f"name=stopped data.input=[{tiny_corpus}/*.jsonl]")
    page.click("#launch button")
    page.wait_for_function("document.querySelector('#logs').textContent.includes('curate: 2 file(s)')", timeout=120_000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent === 'STOPPED'", timeout=60_000)
    page.goto(console)
    row = page.locator('tr[data-run="stopped"]')
    assert row.locator(".status").first.inner_text() == "interrupted"
    assert "curate" in row.locator("td").nth(4).inner_text()


def test_the_console_serves_on_ray_serve_beside_the_endpoint_and_asks_for_the_key(tiny_run, endpoint, monkeypatch):
    from serve.console import build_console

    monkeypatch.setenv("PIPELINE_API_KEY", "console-key")
    serve.run(
        build_console({"runs_dir": tiny_run.runs_dir, "endpoint": endpoint}), name="console", route_prefix="/console"
    )
    url = f"{endpoint}/console"
    assert requests.get(f"{url}/", timeout=30).status_code == 401
    page = requests.get(f"{url}/", headers={"Authorization": "Bearer console-key"}, timeout=30).text
    assert f'href="/console/runs/{tiny_run.name}"' in page
    assert requests.get(f"{endpoint}/healthz", timeout=30).json()["status"] == "ok"  # the model, still at /
    serve.delete("console")
