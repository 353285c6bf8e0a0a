"""Many clients at once, and clients that leave: 64 concurrent streams get exactly the offline
greedy tokens; a client that disconnects is aborted at once and every block comes back."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=512, block_size=16, max_num_batched_tokens=512))
    with BackgroundServer(build_app(engine, [MODEL])) as srv:
        yield srv


def state(server):
    return server.app.state.server


def run(coro, timeout: float = 120):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def test_64_concurrent_streams_get_the_offline_greedy_tokens(server, tiny_model_dir):
    prompts = [f"Client {i} asks about item number {i * 7 % 23} of {'many ' * (i % 5)}things" for i in range(64)]
    offline = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=512, block_size=16)
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)

    async def one(client: openai.AsyncOpenAI, prompt: str):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, logprobs=0,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        text, ids, finish, usage = "", [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                ids += [int(t.split(":")[1]) for t in (choice.logprobs.tokens if choice.logprobs else [])]
                finish = choice.finish_reason or finish
        return text, ids, finish, usage

    async def everyone():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = run(everyone())
    for (text, ids, finish, usage), ref in zip(results, expected):
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
        assert finish == "length" and usage.completion_tokens == 16
    st = state(server).engine.stats()
    assert st.num_free_blocks == st.num_blocks


def _aborted(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pagedllm_request_success_total" and s.labels.get("finished_reason") == "abort":
                return s.value
    return 0.0


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_mid_stream_is_aborted_and_its_blocks_freed(server):
    aborted_before = _aborted(server)
    body = {"model": MODEL, "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
    url = server.url + "/v1/completions"

    async def reader(client, prompt):
        # Count tokens from the usage the stream ends with, not chunks: a reader that
        # falls behind gets several tokens in one chunk.
        tokens = 0
        payload = {**body, "prompt": prompt, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url, json=payload) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[len("data: "):]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        return tokens

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            others = [asyncio.ensure_future(reader(client, f"Other client {i} says")) for i in range(3)]
            async with client.stream("POST", url, json={**body, "prompt": "The client who leaves"}) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: {")
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
            # Aborted while the others are still generating, not when everything ends.
            aborted = await asyncio.get_running_loop().run_in_executor(
                None, lambda: _wait_for(lambda: _aborted(server) == aborted_before + 1)
            )
            running_then = state(server).engine.stats().num_running
            done_then = sum(o.done() for o in others)
            counts = await asyncio.gather(*others)
            return aborted, running_then, done_then, counts

    aborted, running_then, done_then, counts = run(scenario())
    assert aborted and done_then == 0 and running_then == 3
    assert all(c >= 300 for c in counts)  # the others were not disturbed
    engine = state(server).engine
    assert _wait_for(lambda: engine.stats().num_running == 0)
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_waiting == 0


def test_a_non_streaming_client_that_gives_up_is_aborted_too(server):
    aborted_before = _aborted(server)
    body = {"model": MODEL, "prompt": "A long answer please", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    assert _wait_for(lambda: _aborted(server) == aborted_before + 1)
    engine = state(server).engine
    assert _wait_for(lambda: engine.stats().num_free_blocks == engine.stats().num_blocks)
    # And the server still answers.
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
