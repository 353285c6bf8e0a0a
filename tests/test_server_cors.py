"""CORS: by default only local web pages may call the API from a browser; --allowed-origins and friends widen it,
given as vLLM takes them (JSON lists) or as comma lists; preflight OPTIONS is answered without an API key."""

from __future__ import annotations

import argparse

import httpx
import pytest

from pagedllm import LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.cli import add_serve_args
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer
from pagedllm.entrypoints.server.cors import CorsSettings, parse_list

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16))


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})


def test_by_default_only_local_pages_may_call(engine):
    with BackgroundServer(build_app(engine, ["m"], api_key="k")) as srv:
        for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://[::1]:5173", "http://localhost"):
            r = preflight(srv.url, origin)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
            assert "POST" in r.headers["access-control-allow-methods"]
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
        for origin in ("https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io"):
            r = preflight(srv.url, origin)
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, origin
        # A simple request from elsewhere gets its answer, but no header that lets the browser show it to the page.
        r = httpx.get(srv.url + "/health", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_configured_origins_methods_and_credentials(engine):
    cors = CorsSettings(["https://app.example"], ["GET", "POST"], ["content-type", "authorization"], allow_credentials=True)
    with BackgroundServer(build_app(engine, ["m"], cors=cors)) as srv:
        r = preflight(srv.url, "https://app.example")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert preflight(srv.url, "http://localhost:3000").status_code == 400  # the list replaces the local default
        r = httpx.options(srv.url + "/v1/models", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400
    with BackgroundServer(build_app(engine, ["m"], cors=CorsSettings(["*"]))) as srv:
        assert preflight(srv.url, "https://anywhere.example").headers["access-control-allow-origin"] in ("*", "https://anywhere.example")


def test_serve_flags_take_json_or_comma_lists():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--allowed-origins", '["https://a.example", "https://b.example"]',
                              "--allowed-methods", "GET,POST", "--allow-credentials"])
    assert args.allowed_origins == ["https://a.example", "https://b.example"]
    assert args.allowed_methods == ["GET", "POST"] and args.allowed_headers == ["*"] and args.allow_credentials
    assert parser.parse_args([]).allowed_origins is None  # local pages only
    assert parse_list(" a , b ,") == ["a", "b"]
    with pytest.raises(ValueError, match="JSON list of strings"):
        parse_list('["a", 1]')
    with pytest.raises(SystemExit):
        parser.parse_args(["--allowed-origins", "[not json"])
