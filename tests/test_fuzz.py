"""API fuzzing: schemathesis generates requests from the served OpenAPI schema (valid and invalid
bodies for every route) against the real Ray Serve app. Figure: cases run, 5xx seen (target 0);
every error body is JSON."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from ray import serve
from schemathesis import GenerationMode

from pipeline.serving.deploy import serve_args, wait_healthy
from serve.app import build_app

pytestmark = pytest.mark.integration

CASES_PER_OPERATION = 30  # per generation mode: valid requests, then invalid ones


@pytest.fixture(scope="module")
def fuzz_url(tiny_run):
    args = {**serve_args(tiny_run).model_dump(), "max_new_tokens": 8, "api_key_sha256": None}
    serve.start(http_options={"host": "127.0.0.1", "port": tiny_run.serve.port})
    try:
        serve.run(build_app(args), name="fuzz", route_prefix="/fuzz")
        url = f"http://127.0.0.1:{tiny_run.serve.port}/fuzz"
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()


def test_fuzzed_requests_never_get_a_5xx_and_errors_are_json(fuzz_url):
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    seen = {"cases": 0, "5xx": [], "non_json_errors": []}
    operations = [(result.ok(), mode) for result in schema.get_all_operations() for mode in GenerationMode]
    for operation, mode in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=CASES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case):
            response = case.call(base_url=fuzz_url, timeout=60)
            seen["cases"] += 1
            if response.status_code >= 500:
                seen["5xx"].append((operation.label, response.status_code, response.text[:200]))  # noqa: B023
            if response.status_code >= 400:
                try:
                    json.loads(response.text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    error = (operation.label, response.status_code, response.text[:200])  # noqa: B023 - same iteration
                    seen["non_json_errors"].append(error)

        try:
            fuzz()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise  # only a route without parameters has no invalid input to send
    print(
        f"\nFIGURE API fuzzing: {seen['cases']} cases over {len(operations) // 2} operations (valid and invalid "
        f"inputs), {len(seen['5xx'])} 5xx, {len(seen['non_json_errors'])} non-JSON error bodies"
    )
    assert seen["cases"] >= 100
    assert not seen["5xx"], seen["5xx"][:5]
    assert not seen["non_json_errors"], seen["non_json_errors"][:5]
