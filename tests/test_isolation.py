"""One request's failure ends that request alone; a core that dies is noticed at once; a stop lets work finish."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pagedllm import LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

POISON = 4242  # a token id whose presence in a step makes the (patched) forward pass raise


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 4000) for _ in range(rng.randint(5, 60))]} for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_all(engine: LLMEngine, reqs: list[tuple]) -> dict:
    """(id, prompt, params) or (id, a request made by make_request, None) each; every output once finished."""
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))


def test_a_request_whose_sampling_raises_ends_alone(engine):
    ps = prompts(4, seed=1)
    seeded = SamplingParams(temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)
    good = [(f"g{i}", p, greedy(12)) for i, p in enumerate(ps)] + [("s", ps[0], seeded)]
    reference = run_all(engine, [(f"ref-{rid}", p, params) for rid, p, params in good])
    # Parameters the edge refuses, set on requests that passed it (their own copies): a seed no
    # generator takes fails as its row is built; a min_p that is not a number fails the whole
    # batch's sampler, which then samples each row alone.
    bad_seed = engine.make_request(ps[1], SamplingParams(temperature=1.0, seed=1, max_tokens=12), "bad-seed")
    bad_seed.sampling_params.seed = -1180591620717411303424
    bad_min_p = engine.make_request(ps[2], SamplingParams(temperature=1.0, seed=3, max_tokens=12), "bad-min-p")
    bad_min_p.sampling_params.min_p = "x"
    done = run_all(engine, good + [("bad-seed", bad_seed, None), ("bad-min-p", bad_min_p, None)])
    for rid in ("bad-seed", "bad-min-p"):
        out = done[rid]
        assert out.finished and out.outputs[0].finish_reason == "error" and out.error
    assert "bad-seed" in done and "overflow" in done["bad-seed"].error.lower()
    for rid, _, _ in good:
        assert done[rid].outputs[0].finish_reason == "length"
        assert done[rid].outputs[0].token_ids == reference[f"ref-{rid}"].outputs[0].token_ids, rid
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_running == st.num_waiting == 0
    engine.check_invariants()


def test_a_forward_that_fails_for_one_input_ends_that_request_alone(tiny_model_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16, core_process=False))
    ps = prompts(6, seed=2)
    reference = run_all(engine, [(f"ref-{i}", p, greedy(10)) for i, p in enumerate(ps)])
    model = engine.core.runner.model
    real = model.forward
    calls = []

    def forward(input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        if bool((input_ids == POISON).any()):
            raise RuntimeError("injected kernel failure")
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    poisoned = {"prompt_token_ids": ps[3]["prompt_token_ids"][:4] + [POISON] + ps[3]["prompt_token_ids"][4:]}
    reqs = [(f"g{i}", p, greedy(10)) for i, p in enumerate(ps)]
    done = run_all(engine, reqs[:3] + [("poisoned", poisoned, greedy(10))] + reqs[3:])
    assert done["poisoned"].outputs[0].finish_reason == "error"
    assert "injected kernel failure" in done["poisoned"].error
    for i in range(len(ps)):
        assert done[f"g{i}"].outputs[0].token_ids == reference[f"ref-{i}"].outputs[0].token_ids
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and not engine.has_unfinished_requests()
    engine.check_invariants()
    # It keeps serving.
    again = run_all(engine, [("after", ps[0], greedy(10))])
    assert again["after"].outputs[0].token_ids == reference["ref-0"].outputs[0].token_ids


def test_seeds_are_checked_at_the_edge():
    with pytest.raises(ValueError, match="fits in 64 bits"):
        SamplingParams(seed=-1180591620717411303424)
    with pytest.raises(ValueError, match="fits in 64 bits"):
        SamplingParams(seed=1 << 64)
    for seed in (-(1 << 63), (1 << 64) - 1):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", "5", "max_tokens must be an int"),
    ("temperature", "hot", "temperature must be a number"),
    ("seed", 1 << 70, "fits in 64 bits"),
    ("stop", 5, "stop must be a string or a list"),
    ("n", 0, "n must be >= 1"),
])
def test_parameters_changed_after_construction_are_refused_at_the_edge(engine, field, value, message):
    # Set on the object after its checks ran: before, such a value reached the core and stopped it for everyone.
    params = greedy(4)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=message):
        engine.add_request("changed", prompts(1, 7)[0], params)
    done = run_all(engine, [("next", prompts(1, 8)[0], greedy(4))])
    assert done["next"].outputs[0].finish_reason == "length"


def test_a_request_keeps_its_own_parameters_while_its_caller_changes_theirs(engine):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, bad_words=["hello"])
    engine.add_request("own", prompts(1, 9)[0], params)
    params.max_tokens = 50
    done = run_all(engine, [])
    assert len(done["own"].outputs[0].token_ids) == 3
    assert params.bad_words_token_ids is None  # the tokenized bad words went to the request's copy


def test_extreme_seeds_sample_with_n_greater_than_one(engine):
    # The largest seed a generator takes, with n > 1: sample i's seed (seed + i) wraps within 64 bits.
    params = SamplingParams(n=3, temperature=1.0, seed=(1 << 64) - 1, max_tokens=4, ignore_eos=True)
    done = run_all(engine, [("big", prompts(1, 5)[0], params), ("small", prompts(1, 6)[0], SamplingParams(seed=-(1 << 63), max_tokens=4))])
    assert [c.finish_reason for c in done["big"].outputs] == ["length"] * 3
    assert done["small"].outputs[0].finish_reason in ("length", "stop")


def test_a_dead_core_process_fails_requests_in_flight_and_refuses_new_ones(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16))
    engine.add_request("long", prompts(1, 3)[0], greedy(100_000 // 1000))
    engine.step()
    os.kill(engine.info.pid, signal.SIGKILL)
    # Steps may still hand out tokens the core sent before it died; then one must raise. The
    # deadline only turns a hang into a failure that says so; it is not a speed requirement.
    deadline = time.monotonic() + 60
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        while time.monotonic() < deadline:
            engine.step()
        pytest.fail("engine.step() kept returning for 60s after the core process was killed")
    with pytest.raises(EngineDeadError):
        engine.stats()
    with pytest.raises(EngineDeadError):
        engine.add_request("new", "hello", greedy(2))


def test_killing_the_core_gives_503_and_errors_not_a_hang(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))
    with BackgroundServer(build_app(engine, ["tiny"])) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True}
        results = {}

        def plain():
            results["plain"] = http.post("/v1/completions", json=body)

        def streamed():
            results["stream"] = http.post("/v1/completions", json={**body, "stream": True})

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while engine.stats().num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(engine.info.pid, signal.SIGKILL)
        # Both requests must end (with the errors checked below) rather than hang. The wait is
        # bounded below the client's 30s read timeout, so a hang shows as a live thread here.
        deadline = time.monotonic() + 25
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a request hung after the core died"
        r = results["plain"]
        assert r.status_code == 503 and "died" in r.json()["error"]["message"]
        events = [line for line in results["stream"].text.splitlines() if line.startswith("data: ")]
        assert '"error"' in events[-2] and "died" in events[-2] and events[-1] == "data: [DONE]"
        health = http.get("/health")
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_requests_in_flight_finish(tiny_model_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--model", tiny_model_dir, "--dtype", "float32",
         "--kv-cache-memory", "64MiB", "--port", str(port), "--shutdown-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        results = {}
        body = {"prompt": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}

        def plain():
            results["plain"] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        def streamed():
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both are running
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert server.wait(60) == 0
        r = results["plain"]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
        assert r.json()["choices"][0]["finish_reason"] == "length"
        events = results["stream"]
        assert events[-1] == "data: [DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:]).get("choices", [])]
        assert finishes[-1] == "length"
        with pytest.raises(httpx.ConnectError):  # it stopped accepting
            httpx.get(url + "/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
