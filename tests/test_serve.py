"""The serve/ app on a real local Ray Serve (127.0.0.1), serving the tiny run's AWQ model with two
LoRA adapters beside it: every route over plain HTTP and through the official openai client, adapters
picked by `model` and mixed in one batch, errors, API key, batching, queue limit, timeout and
autoscaling."""

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from peft import PeftModel
from ray import serve
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from conftest import lora_adapter
from pipeline.config import ConfigError
from pipeline.handoff import merged_model_dir, served_model_dir, trained_model
from pipeline.loading import load_model, load_tokenizer
from pipeline.serving.adapters import BASE, WITHDRAWN
from pipeline.serving.deploy import serve_args, wait_healthy
from pipeline.serving.transformers_engine import load_with_adapters
from serve.app import build_app

pytestmark = pytest.mark.integration

KEY = "test-key-123"
ADAPTERS = ("alpha", "beta")
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_app(cfg, name: str, **overrides) -> str:
    """Deploy one more copy of the app under /<name> with ServeArgs overrides; returns its URL."""
    args = {**serve_args(cfg).model_dump(), **overrides}
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{cfg.serve.port}/{name}"
    wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def adapters(tiny_run, tmp_path_factory) -> Path:
    """Two adapters on the run's 16-bit model, which the served 4-bit model was quantized from."""
    folder = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        lora_adapter(merged_model_dir(tiny_run), folder / name, seed)
    return folder


@pytest.fixture(scope="module")
def app(tiny_run, adapters):
    os.environ[tiny_run.serve.api_key_env] = KEY  # serve_args hashes it; the replicas never see it
    try:
        url = start_app(tiny_run, "main", max_batch_size=8, batch_wait_timeout_s=0.2, adapters_dir=str(adapters))
    finally:
        del os.environ[tiny_run.serve.api_key_env]
    yield url, tiny_run.name
    serve.shutdown()


def post(url, path, body, headers=AUTH, **kw):
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=60, **kw)


def sse_events(response) -> list:
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_generate_and_health(app):
    url, _ = app
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"  # open: probes carry no key
    body = post(url, "/generate", {"prompt": "Permission is hereby", "max_new_tokens": 12, "stop": ["zzz"]}).json()
    assert isinstance(body["text"], str) and 1 <= body["completion_tokens"] <= 12
    assert body["prompt_tokens"] > 0 and body["finish_reason"] in ("stop", "length")


def test_openai_routes_over_plain_http(app):
    url, model = app
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == model
    c = post(
        url, "/v1/completions", {"model": model, "prompt": "The software", "max_tokens": 8, "temperature": 0}
    ).json()
    assert c["object"] == "text_completion" and isinstance(c["choices"][0]["text"], str)
    assert c["usage"]["completion_tokens"] <= 8
    assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
    chat = post(
        url,
        "/v1/chat/completions",
        {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Name a licence."}]},
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"


def test_streaming_sse_ends_with_done_and_usage(app):
    url, model = app
    r = post(
        url,
        "/v1/completions",
        {
            "model": model,
            "prompt": "Copyright",
            "max_tokens": 10,
            "stream": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        },
        stream=True,
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    plain = post(
        url, "/v1/completions", {"model": model, "prompt": "Copyright", "max_tokens": 10, "temperature": 0}
    ).json()
    assert text == plain["choices"][0]["text"]  # greedy: streaming and batch generation agree
    assert plain["usage"] == events[-1]["usage"], "usage is counted the same way streamed or not"
    chat = sse_events(
        post(
            url,
            "/v1/chat/completions",
            {"model": model, "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            stream=True,
        )
    )
    assert chat[0]["object"] == "chat.completion.chunk" and chat[0]["choices"][0]["delta"]["role"] == "assistant"


def test_openai_parameters_are_honoured_or_refused_by_name(app):
    url, model = app
    chat = {
        "model": model,
        "max_tokens": 6,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Permission is "}, {"type": "text", "text": "hereby"}],
            }
        ],
    }
    sampled = {**chat, "n": 3, "temperature": 1.0, "seed": 11}
    first = post(url, "/v1/chat/completions", sampled).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in post(url, "/v1/chat/completions", sampled).json()["choices"]]
    assert first["usage"]["completion_tokens"] >= 3

    scored = post(url, "/v1/chat/completions", {**chat, "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    tokens = scored["choices"][0]["logprobs"]["content"]
    assert tokens and all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in tokens)
    assert "".join(t["token"] for t in tokens).startswith(scored["choices"][0]["message"]["content"][:3])
    legacy = post(
        url,
        "/v1/completions",
        {"model": model, "prompt": "Permission", "max_tokens": 4, "temperature": 0, "logprobs": 1},
    ).json()["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) >= 1
    echo = {"model": model, "prompt": "Permission is hereby", "max_tokens": 1, "temperature": 0, "logprobs": 1}
    echoed = post(url, "/v1/completions", {**echo, "echo": True}).json()["choices"][0]  # as lm-eval asks
    scores = echoed["logprobs"]
    assert echoed["text"].startswith("Permission is hereby") and "".join(scores["tokens"]) == echoed["text"]
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None  # nothing predicts it
    assert all(lp <= 0 for lp in scores["token_logprobs"][1:]) and len(scores["tokens"]) >= 3
    ids = [40, 7, 80, 12]  # a prompt as token ids, as lm-eval sends a window of a document (ASCII bytes)
    by_ids = post(url, "/v1/completions", {**echo, "prompt": [ids], "echo": True}).json()
    scores = by_ids["choices"][0]["logprobs"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids) and len(scores["tokens"]) == len(ids) + 1
    assert by_ids["choices"][0]["text"].startswith("".join(scores["tokens"][: len(ids)]))
    assert scores["token_logprobs"][0] is None

    penalised = post(
        url, "/v1/chat/completions", {**chat, "temperature": 0, "presence_penalty": 2.0, "frequency_penalty": 2.0}
    )
    assert penalised.status_code == 200
    for extra, param in (
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_p": 0}, "top_p"),
    ):
        refused = post(url, "/v1/chat/completions", {**chat, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_official_openai_client(app):
    url, model = app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [model, *ADAPTERS]
    c = client.completions.create(model=model, prompt="Permission", max_tokens=6, temperature=0)
    assert c.usage.completion_tokens <= 6 and isinstance(c.choices[0].text, str)
    chat = client.chat.completions.create(
        model="alpha", max_tokens=6, messages=[{"role": "user", "content": "Which licence?"}]
    )
    assert chat.choices[0].message.role == "assistant" and chat.model == "alpha"
    pieces = list(
        client.chat.completions.create(
            model=model,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}],
        )
    )
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/generate", {"prompt": ""}, 400, "prompt"),
        ("/generate", {"prompt": 3}, 400, "prompt"),
        ("/generate", {"max_new_tokens": 5}, 400, "prompt"),
        ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
        ("/generate", {"prompt": "hi", "max_new_tokens": 100000}, 400, "max_tokens"),
        ("/generate", {"prompt": "word " * 5000}, 400, "prompt"),
        ("/generate", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [5, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": [[-1]]}, 400, "prompt"),
        ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "echo": True, "stream": True}, 400, None),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ],
)
def test_bad_input_is_a_4xx_json_error(app, path, body, status, param):
    url, _ = app
    r = post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text
    if param:
        assert param in (err["param"] or "")


def test_malformed_json_and_unknown_route(app):
    url, _ = app
    r = requests.post(
        f"{url}/generate", data="{not json", headers={**AUTH, "content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = requests.get(f"{url}/nope", headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_hostile_bodies_headers_and_text_get_a_fast_4xx(app):
    """#21's input-safety pass: an oversized body (declared or chunked) is refused before it is parsed,
    a huge header is refused, NUL bytes are text, lone surrogates and invalid UTF-8 are 400s, a 100k-token
    prompt is refused by count, and a path in a request field names nothing."""
    url, name = app
    raw = {**AUTH, "content-type": "application/json"}
    body = b'{"prompt": "' + b"a" * 50_000_000 + b'"}'
    start = time.perf_counter()
    r = requests.post(f"{url}/generate", data=body, headers=raw, timeout=60)
    declared_s = time.perf_counter() - start
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text

    def chunks():  # no Content-Length: refused once the chunks pass the limit
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * 1_000_000
        yield b'"}'

    start = time.perf_counter()
    r = requests.post(f"{url}/generate", data=chunks(), headers=raw, timeout=60)
    chunked_s = time.perf_counter() - start
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text

    r = requests.get(f"{url}/healthz", headers={"x-padding": "a" * 100_000}, timeout=10)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large", r.text

    assert post(url, "/generate", {"prompt": "a\u0000b", "max_new_tokens": 2}).status_code == 200
    r = requests.post(f"{url}/generate", data=b'{"prompt": "a\\ud800b"}', headers=raw, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    chat = b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udfff"}]}]}'
    r = requests.post(f"{url}/v1/chat/completions", data=chat % name.encode(), headers=raw, timeout=10)
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
    r = requests.post(f"{url}/generate", data=b'{"prompt": "\xff\xfe"}', headers=raw, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text

    start = time.perf_counter()
    r = post(url, "/generate", {"prompt": "word " * 100_000})
    long_s = time.perf_counter() - start
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = post(url, "/v1/completions", {"model": "../../../etc/passwd", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    print(
        f"\nFIGURE input safety: 50 MB body 413 in {declared_s:.2f} s (declared), {chunked_s:.2f} s (chunked); "
        f"100 KB header 431; 100k-token prompt 400 in {long_s:.2f} s"
    )


def test_api_key_is_enforced(app):
    url, model = app
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(url, "/generate", {"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert requests.post(f"{url}/generate", json={"prompt": ""}, timeout=10).status_code == 401  # key before body


def test_serve_batch_groups_concurrent_requests(app):
    url, _ = app

    def one(i):
        return post(url, "/generate", {"prompt": f"Permission number {i}", "max_new_tokens": 8}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    metrics = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    sizes = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("llm_batch_size_")
    }
    batches, requests_batched = sizes["llm_batch_size_count"], sizes["llm_batch_size_sum"]
    assert requests_batched / batches > 1.5, sizes  # several requests shared one model.generate
    assert 'llm_requests_total{route="/generate",status="200"}' in metrics
    assert "llm_tokens_total" in metrics and "llm_queue_length" in metrics


def test_queue_limit_429_and_timeout_408(tiny_run, app):
    url = start_app(tiny_run, "tight", max_queue=2, batch_wait_timeout_s=2.0, max_batch_size=64, request_timeout_s=0.5)

    def one(_):
        return requests.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(429) >= 4 and set(codes) <= {408, 429}, codes
    assert all(r.json()["error"]["message"] for r in responses)
    serve.delete("tight")


def test_autoscaling_up_under_load_and_back_down(tiny_run, app):
    url = start_app(
        tiny_run,
        "scaled",
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=4,
        num_cpus=0.25,
        max_batch_size=1,
    )

    def running() -> int:
        states = serve.status().applications["scaled"].deployments["Generator"].replica_states
        return states.get("RUNNING", 0)

    stop, seen = time.time() + 60, [running()]

    def client(_):
        while time.time() < stop and seen[-1] < 2:
            requests.post(f"{url}/generate", json={"prompt": "load", "max_new_tokens": 16}, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        while time.time() < stop and seen[-1] < 2:
            time.sleep(1)
            seen.append(running())
        stop = 0
        for f in futures:
            f.result()
    assert max(seen) >= 2, f"never scaled up: {seen}"
    deadline = time.time() + 90
    while running() > 1 and time.time() < deadline:
        time.sleep(2)
    assert running() == 1, "did not scale back down after the load stopped"
    serve.delete("scaled")


PROMPT = "Permission is hereby granted"


def greedy_alone(tiny_run, adapters: dict[str, Path], max_new_tokens: int = 10) -> dict[str, str]:
    """Reference answers from peft itself, outside the server: the base model's greedy text (under the
    run's name) and each adapter's, one at a time."""
    awq = served_model_dir(tiny_run)
    tokenizer = load_tokenizer(awq)
    unpacked = CompressedTensorsConfig(run_compressed=False)  # peft adds LoRA to unpacked 4-bit weights
    model = load_model(AutoModelForCausalLM, awq, quantization_config=unpacked)
    for name, path in adapters.items():
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
    answers = {}
    for name in [tiny_run.name, *adapters]:
        enc = tokenizer(PROMPT, return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, adapter_names=[name if name in adapters else BASE]
        )
        answers[name] = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def ask(url: str, model: str, max_tokens: int = 10) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    response = post(url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["text"]


def test_adapters_are_models_beside_the_base_and_a_batch_may_mix_them(app, tiny_run, adapters):
    url, name = app
    listed = requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == [name, *ADAPTERS]
    assert all(m["parent"] == name for m in listed[1:])
    models = [name, *ADAPTERS]
    expected = greedy_alone(tiny_run, {a: adapters / a for a in ADAPTERS})
    assert len(set(expected.values())) == 3, expected  # the adapters change the answer
    assert {m: ask(url, m) for m in models} == expected  # one at a time
    with ThreadPoolExecutor(9) as pool:  # together: batches that mix the three
        mixed = list(pool.map(lambda m: ask(url, m), models * 3))
    assert mixed == [expected[m] for m in models * 3]
    generate = post(url, "/generate", {"model": "beta", "prompt": PROMPT, "max_new_tokens": 10}).json()
    assert generate["text"] == expected["beta"]


def test_an_unknown_adapter_is_a_404_naming_the_models_served(app):
    url, name = app
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/generate", {"prompt": "hi"})):
        response = post(url, path, {**body, "model": "gamma"})
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert "'gamma'" in message and all(f"'{m}'" in message for m in (name, *ADAPTERS)), message


def test_an_adapter_trained_on_another_base_is_refused_at_load(tiny_run, tmp_path):
    """The run's pretrained base is not the model it served: an adapter of that base does not fit."""
    other = lora_adapter(trained_model(tiny_run).base_model, tmp_path / "elsewhere", seed=3)
    with pytest.raises(ConfigError, match="was trained on the base model in .* and .* is another model"):
        load_with_adapters(str(served_model_dir(tiny_run)), False, {"elsewhere": other})


def loaded_adapters(url: str) -> float:
    metrics = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("llm_adapters_loaded ")))


def test_adapters_arrive_change_and_leave_without_a_restart(tiny_run, app, tmp_path):
    """A server on a folder of its own, with room for two loaded adapters on its one replica: an adapter
    added to the folder answers after a reload (behind the API key); one rewritten while requests for it
    run answers with its old version until the new one has loaded, and no request fails; DELETE takes one
    off the server and keeps its files; three adapters through two slots still answer as peft does."""
    base16, folder = merged_model_dir(tiny_run), tmp_path / "adapters"
    first = {"alpha": lora_adapter(base16, folder / "alpha", seed=0)}
    os.environ[tiny_run.serve.api_key_env] = KEY
    try:
        url = start_app(
            tiny_run, "hot", adapters_dir=str(folder), max_loras=2, adapters_scan_s=0, max_replicas=1, num_cpus=0.25
        )
    finally:
        del os.environ[tiny_run.serve.api_key_env]
    name = tiny_run.name
    new = {a: lora_adapter(base16, tmp_path / "new" / a, seed) for a, seed in (("alpha", 7), ("gamma", 5), ("beta", 1))}
    old_answers, new_answers = greedy_alone(tiny_run, first), greedy_alone(tiny_run, new)
    assert ask(url, "alpha") == old_answers["alpha"] != new_answers["alpha"]

    # added: served after a reload, which needs the key
    shutil.copytree(new["gamma"], folder / "gamma")
    assert post(url, "/v1/adapters/reload", {}, headers={}).status_code == 401
    report = post(url, "/v1/adapters/reload", {}).json()
    assert report["added"] == ["gamma"] and report["served"] == ["alpha", "gamma"], report
    assert ask(url, "gamma") == new_answers["gamma"]

    # rewritten under load: every request answers, with the old version or the new one
    stop = threading.Event()

    def keep_asking() -> list[str]:
        answers = [ask(url, "alpha")]
        while not stop.is_set():
            answers.append(ask(url, "alpha"))
        return answers

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(keep_asking) for _ in range(4)]
        time.sleep(0.5)
        for f in new["alpha"].iterdir():
            shutil.copy(f, folder / "alpha" / f.name)
        report = post(url, "/v1/adapters/reload", {}).json()
        time.sleep(0.5)
        stop.set()
        during = [answer for r in running for answer in r.result()]
    assert report["replaced"] == ["alpha"], report
    assert old_answers["alpha"] in during and set(during) <= {old_answers["alpha"], new_answers["alpha"]}, during
    assert ask(url, "alpha") == new_answers["alpha"]

    # deleted: off the server, files kept aside
    gone = requests.delete(f"{url}/v1/adapters/gamma", headers=AUTH, timeout=30).json()
    assert gone["removed"] == ["gamma"] and Path(gone["moved_to"]).parent == folder / WITHDRAWN, gone
    assert (Path(gone["moved_to"]) / "adapter_model.safetensors").is_file()
    assert post(url, "/v1/completions", {"model": "gamma", "prompt": PROMPT}).status_code == 404
    assert requests.delete(f"{url}/v1/adapters/gamma", headers=AUTH, timeout=30).status_code == 404
    base = requests.delete(f"{url}/v1/adapters/{name}", headers=AUTH, timeout=30)
    assert base.status_code == 400 and "is the base model" in base.json()["error"]["message"], base.text

    # three adapters, two slots: the least recently used one is unloaded and loaded again when asked for
    shutil.copytree(new["beta"], folder / "beta")
    shutil.copytree(new["gamma"], folder / "delta")
    assert post(url, "/v1/adapters/reload", {}).json()["served"] == ["alpha", "beta", "delta"]
    listed = requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == [name, "alpha", "beta", "delta"]
    for model in ["alpha", "beta", "delta"] * 2:
        assert ask(url, model) == new_answers["gamma" if model == "delta" else model], model
        assert loaded_adapters(url) <= 2
    serve.delete("hot")
