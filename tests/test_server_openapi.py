"""/openapi.json says what the server really answers: each API route lists its 400/401/404/503 (and 500) with
OpenAI's error shape and no FastAPI 422; /metrics is text/plain; and a real error matches the documented schema."""

from __future__ import annotations

import httpx
import pytest

from pagedllm import LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

ERROR_REF = "#/components/schemas/ErrorResponse"
ROUTES = {  # (path, method): the error statuses a client must be ready for
    ("/v1/completions", "post"): {"400", "401", "404", "500", "503"},
    ("/v1/chat/completions", "post"): {"400", "401", "404", "500", "503"},
    ("/tokenize", "post"): {"400", "401", "404", "503"},
    ("/detokenize", "post"): {"400", "401", "404", "503"},
    ("/v1/models", "get"): {"401", "503"},
    ("/health", "get"): {"503"},
}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16))
    with BackgroundServer(build_app(engine, ["m"], api_key="k")) as srv:
        yield srv, httpx.get(srv.url + "/openapi.json").json()


def resolve(doc: dict, ref: str) -> dict:
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_every_api_route_documents_openai_errors(served):
    _, doc = served
    error = resolve(doc, ERROR_REF)
    assert error["required"] == ["error"]
    detail = resolve(doc, error["properties"]["error"]["$ref"])
    assert set(detail["properties"]) == {"message", "type", "param", "code"} and set(detail["required"]) == {"message", "type"}
    for (path, method), statuses in ROUTES.items():
        responses = doc["paths"][path][method]["responses"]
        assert "422" not in responses, path  # bad input is a 400 here, never FastAPI's 422
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF, (path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_success_shapes_and_metrics(served):
    _, doc = served
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert completions["application/json"]["schema"]["$ref"].endswith("/CompletionResponse")
    assert "text/event-stream" in completions
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    usage = resolve(doc, "#/components/schemas/UsageInfo")
    assert "prompt_tokens_details" in usage["properties"]
    assert "system_fingerprint" in resolve(doc, "#/components/schemas/CompletionResponse")["properties"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"] and metrics["text/plain"]["schema"]["type"] == "string"


def test_real_errors_match_the_documented_shape(served):
    srv, doc = served
    detail = resolve(doc, resolve(doc, ERROR_REF)["properties"]["error"]["$ref"])
    answers = [
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": "ten"}, headers={"Authorization": "Bearer k"}),
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}),
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "model": "nope"}, headers={"Authorization": "Bearer k"}),
    ]
    assert [r.status_code for r in answers] == [400, 401, 404]
    for r in answers:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == set(detail["properties"])
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
    metrics = httpx.get(srv.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
