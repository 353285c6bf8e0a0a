"""/metrics parses with prometheus_client's own parser, and its counters, histograms and gauges move with requests."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm import LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=16))
    with BackgroundServer(build_app(engine, [MODEL])) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def scrape(server) -> dict[tuple[str, tuple], float]:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return samples.get(key, 0.0)


def test_counters_and_histograms_move_after_requests(server, client):
    before = scrape(server)
    for name in ("pagedllm_num_requests_running", "pagedllm_num_requests_waiting", "pagedllm_kv_cache_usage_perc",
                 "pagedllm_num_preemptions_total", "pagedllm_prompt_tokens_total", "pagedllm_generation_tokens_total",
                 "pagedllm_time_to_first_token_seconds_count", "pagedllm_inter_token_latency_seconds_count",
                 "pagedllm_e2e_request_latency_seconds_count"):
        assert (name, (("model_name", MODEL),)) in before, name

    stream = client.completions.create(model=MODEL, prompt="Count the sheep", max_tokens=7, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage1 = [c.usage for c in stream if c.usage][0]
    usage2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            extra_body={"ignore_eos": True}).usage
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pagedllm_prompt_tokens_total") == usage1.prompt_tokens + usage2.prompt_tokens
    assert delta("pagedllm_generation_tokens_total") == 7 + 5
    assert delta("pagedllm_time_to_first_token_seconds_count") == 2
    assert delta("pagedllm_inter_token_latency_seconds_count") == 6 + 4
    assert delta("pagedllm_e2e_request_latency_seconds_count") == 2
    assert delta("pagedllm_e2e_request_latency_seconds_sum") > 0
    assert delta("pagedllm_request_success_total", finished_reason="length") == 2
    assert value(after, "pagedllm_time_to_first_token_seconds_bucket", le="+Inf") == value(after, "pagedllm_time_to_first_token_seconds_count")
    assert value(after, "pagedllm_num_requests_running") == 0 and value(after, "pagedllm_kv_cache_usage_perc") == 0


def test_gauges_show_a_request_while_it_runs(server):
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # next(), not a for loop: leaving one would close the stream and abort it
        while not next(lines).startswith("data: {"):
            pass
        during = scrape(server)
        rest = sum(line.startswith("data: {") for line in lines)
    assert rest > 0  # the request was still running when scraped
    assert value(during, "pagedllm_num_requests_running") == 1
    assert 0 < value(during, "pagedllm_kv_cache_usage_perc") <= 1


def test_prefix_cache_hits_are_counted(server, client):
    prompt = "A long shared system prompt that spans more than two blocks of sixteen tokens each, " * 2
    before = scrape(server)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    after = scrape(server)
    assert value(after, "pagedllm_prefix_cache_hits_total") - value(before, "pagedllm_prefix_cache_hits_total") >= 32
