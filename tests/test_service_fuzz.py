"""A bounded schemathesis fuzz of the OpenAI routes, built from the app's own /openapi.json
(the request models are documented there): whatever the body, the answer is never a 5xx,
and every error is in OpenAI's shape. In-process server, tiny random model."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from dflash_core.api import build_engine, load_tokenizer
from service.config import ServiceConfig
from service.engines import engine_config
from service.local import LocalServer


@pytest.fixture(scope="module")
def fuzz_server():
    cfg = ServiceConfig(target="tiny-random", drafter="random", max_slots=4, max_seq_len=96, block_size=4,
                        block_size_schedule=None, served_model_name="tiny", log_level="ERROR", max_queue=64)
    engine, _ = build_engine(cfg.target, cfg.drafter, engine_config(cfg), tokenizer=False)
    with LocalServer(cfg, engine, load_tokenizer("tiny-random")) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def test_openapi_documents_the_request_bodies(api_schema):
    raw = api_schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "max_tokens" in body["properties"] and body.get("additionalProperties") is False
    assert "prompt" in raw["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["required"]


def test_no_request_gets_a_5xx(api_schema, fuzz_server):
    """Per POST route, 60 bodies drawn from the schema and from violations of it (derandomized)."""
    from hypothesis import given
    from schemathesis.generation import GenerationMode
    fuzzed = []
    for result in api_schema.get_all_operations():
        op = result.ok()
        if not (op.path.startswith("/v1/") and op.method.upper() == "POST"):
            continue
        fuzzed.append(op.path)
        cases = op.as_strategy(generation_mode=GenerationMode.POSITIVE) | \
            op.as_strategy(generation_mode=GenerationMode.NEGATIVE)

        @given(case=cases)
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            assert response.status_code < 500, (case.body, response.status_code, response.text[:300])
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text[:300]

        check()
    assert sorted(fuzzed) == ["/v1/chat/completions", "/v1/completions"]
