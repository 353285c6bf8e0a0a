"""use_beam_search over HTTP returns the same sequences as the offline beam search (LLM.beam_search), in float32,
on /v1/completions and /v1/chat/completions, while the engine serves other requests; and its 400s."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pagedllm import LLM, BeamSearchParams, LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

PROMPTS = ["The capital of France is", "def add(a, b):"]


def served(model_dir, **engine_kw):
    engine = LLMEngine(EngineConfig(model_dir, dtype="float32", block_size=16, **engine_kw))
    return BackgroundServer(build_app(engine, ["m"]))


def beams_over_http(url: str, body: dict, path: str = "/v1/completions") -> list[dict]:
    r = httpx.post(url + path, json={"model": "m", "use_beam_search": True, "return_token_ids": True, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    with served(tiny_model_dir, num_kv_blocks=256) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny_offline(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16)


@pytest.mark.parametrize("width,max_tokens,extra", [
    (2, 6, {}),
    (4, 10, {"length_penalty": 0.5}),
    (3, 8, {"early_stopping": True}),
])
def test_tiny_model_beams_equal_the_offline_search(tiny_server, tiny_offline, width, max_tokens, extra):
    tok = tiny_offline.get_tokenizer()
    for prompt in PROMPTS:
        ref = tiny_offline.beam_search({"prompt_token_ids": tok.encode(prompt)},
                                       BeamSearchParams(beam_width=width, max_tokens=max_tokens, **extra))[0]
        r = beams_over_http(tiny_server.url, {"prompt": prompt, "n": width, "max_tokens": max_tokens, **extra})
        got = [c["token_ids"] for c in r["choices"]]
        assert got == [s.output_token_ids for s in ref.sequences]
        assert [c["text"] for c in r["choices"]] == [s.text for s in ref.sequences]
        assert [c["finish_reason"] for c in r["choices"]] == [s.finish_reason for s in ref.sequences]
        assert [c["index"] for c in r["choices"]] == list(range(width))
        assert r["usage"]["completion_tokens"] == sum(len(t) for t in got)


def test_beams_run_alongside_other_requests_and_report_logprobs(tiny_server, tiny_offline):
    tok = tiny_offline.get_tokenizer()
    ref = tiny_offline.beam_search({"prompt_token_ids": tok.encode(PROMPTS[0])}, BeamSearchParams(beam_width=3, max_tokens=8))[0]

    async def both():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=300) as c:
            other = c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True})
            beams = c.post("/v1/completions", json={"prompt": PROMPTS[0], "n": 3, "max_tokens": 8, "use_beam_search": True,
                                                    "return_token_ids": True, "logprobs": 2})
            return await asyncio.gather(other, beams)

    other, beams = asyncio.run(both())
    assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 40
    choices = beams.json()["choices"]
    assert [c["token_ids"] for c in choices] == [s.output_token_ids for s in ref.sequences]
    for c, s in zip(choices, ref.sequences):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(s.output_token_ids)
        assert sum(lp["token_logprobs"]) == pytest.approx(s.cum_logprob, abs=1e-3)
        assert all(len(top) <= 3 for top in lp["top_logprobs"])


def test_chat_beams_equal_the_offline_search_on_the_chat_prompt(tiny_server, tiny_offline):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = beams_over_http(tiny_server.url, {"messages": messages, "n": 2, "max_tokens": 6}, "/v1/chat/completions")
    ref = tiny_offline.beam_search({"prompt_token_ids": r["prompt_token_ids"]}, BeamSearchParams(beam_width=2, max_tokens=6))[0]
    assert [c["token_ids"] for c in r["choices"]] == [s.output_token_ids for s in ref.sequences]
    assert [c["message"]["content"] for c in r["choices"]] == [s.text for s in ref.sequences]


@pytest.mark.parametrize("body,param,words", [
    ({"stream": True}, "stream", "streaming is not supported with use_beam_search"),
    ({"temperature": 0.7}, "temperature", "temperature must be 0"),
    ({"top_p": 0.5}, "top_p", "cannot be used with use_beam_search"),
    ({"stop": ["."]}, "stop", "cannot be used with use_beam_search"),
    ({"n": 65}, "n", "n (the beam width) must be an integer in [1, 64]"),
    ({"use_beam_search": False, "length_penalty": 0.5}, "length_penalty", "applies only to beam search"),
    ({"early_stopping": "sometimes"}, "early_stopping", "early_stopping"),
    ({"echo": True, "logprobs": 1}, "echo", "echo with logprobs is not supported with use_beam_search"),
])
def test_what_beam_search_cannot_honour_is_a_400(tiny_server, body, param, words):
    r = httpx.post(tiny_server.url + "/v1/completions",
                   json={"prompt": "Hi", "max_tokens": 4, "n": 2, "use_beam_search": True, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param


def test_default_model_beams_equal_the_offline_search(default_model_path):
    """Real text, where EOS ends beams early: the finished hypotheses must agree too."""
    offline = LLM(default_model_path, dtype="float32", kv_cache_memory="128MiB", max_model_len=512, block_size=16)
    tok = offline.get_tokenizer()
    refs = offline.beam_search([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS], BeamSearchParams(beam_width=3, max_tokens=12))
    del offline
    with served(default_model_path, kv_cache_memory="128MiB", max_model_len=512) as srv:
        r = beams_over_http(srv.url, {"prompt": PROMPTS, "n": 3, "max_tokens": 12})
    got = [c["token_ids"] for c in r["choices"]]
    want = [s.output_token_ids for ref in refs for s in ref.sequences]
    assert got == want
