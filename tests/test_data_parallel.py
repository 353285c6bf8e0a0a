"""data_parallel_size: several engine cores behind one frontend, routed by cached prefix, then by load."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import httpx
import pytest

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import EngineDeadError, make_client
from pagedllm.engine.dp_client import DPClient, PrefixIndex, block_hashes, cpu_shares, merge_stats
from pagedllm.engine.outputs import EngineStats
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

BLOCK = 16


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def random_prompts(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_all(engine: LLMEngine) -> dict:
    """Step until nothing is left; every finished output, checking that none comes twice."""
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, f"{out.request_id} finished twice"
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=BLOCK, data_parallel_size=2)
    yield llm
    llm.engine.shutdown()


# --- without a model ---------------------------------------------------------
def test_block_hashes_chain_so_a_block_matches_only_after_the_same_prefix():
    a = list(range(40))
    b = list(range(16)) + [99] * 16 + list(range(32, 40))
    ha, hb = block_hashes(a, BLOCK), block_hashes(b, BLOCK)
    assert len(ha) == 2 and ha[0] == hb[0] and ha[1] != hb[1]
    c = [7] * 16 + a[16:32]  # a's second block after another first block
    assert block_hashes(c, BLOCK)[1] != ha[1]
    index = PrefixIndex(capacity=3)
    index.add(ha)
    assert index.match(ha) == 2 and index.match(hb) == 1 and index.match(block_hashes(c, BLOCK)) == 0
    index.add(block_hashes([5] * 32, BLOCK))  # 4 hashes in a 3-hash index: the least recently used goes
    assert len(index) == 3 and index.match(ha) == 0


def test_stats_of_the_cores_add_up():
    one = EngineStats(num_blocks=10, num_free_blocks=6, num_used_blocks=4, num_running=2, num_waiting=1,
                      num_preemptions=1, kv_utilization=0.5, prefix_cache_hits=32, num_steps=7)
    two = EngineStats(num_blocks=10, num_free_blocks=9, num_used_blocks=1, num_running=1, num_waiting=0,
                      num_preemptions=0, kv_utilization=1.0, prefix_cache_hits=16, num_steps=3)
    total = merge_stats([one, two])
    assert (total.num_blocks, total.num_used_blocks, total.num_running, total.prefix_cache_hits, total.num_steps) == (20, 5, 3, 48, 10)
    assert total.kv_utilization == pytest.approx((0.5 * 4 + 1.0) / 5)
    assert total.per_engine == [one, two]


def test_each_core_gets_its_own_cpus_and_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    envs, cpus = cpu_shares(2)
    assert cpus == [[0, 1], [2, 3]]
    assert envs == [{"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "3"}, {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "5"}]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's lower count stands
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    envs, cpus = cpu_shares(8)  # more cores than CPUs: none pinned, one thread each
    assert cpus == [None] * 8 and all(e == {"OMP_NUM_THREADS": "1"} for e in envs)


def test_data_parallel_needs_core_processes():
    with pytest.raises(ValueError, match="core_process=True"):
        make_client(EngineConfig(data_parallel_size=2, core_process=False))


# --- two cores -----------------------------------------------------------------
def test_two_cores_answer_every_request_once_with_the_tokens_of_one(llm, tiny_model_dir):
    engine = llm.engine
    client = engine.client
    assert isinstance(client, DPClient) and len({i.pid for i in client.infos}) == 2
    assert engine.num_blocks == 2 * 128
    prompts = random_prompts(48, seed=1)
    params = [greedy(random.Random(i).randint(1, 12)) for i in range(48)]
    before = client.routing_counts()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    routed = [r - b for (r, _), (b, _) in zip(client.routing_counts(), before)]
    assert sum(routed) == 48 and min(routed) >= 12, routed  # random prompts share no prefix: spread by load

    one = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=BLOCK))
    try:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            one.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
        reference = run_all(one)
    finally:
        one.shutdown()
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference[f"r{i}"].outputs[0].token_ids, i

    # The same through step(): each id finishes exactly once; afterwards every block of every core is free.
    for i, p in enumerate(prompts[:16]):
        engine.add_request(f"s{i}", {"prompt_token_ids": p}, params[i])
    done = run_all(engine)
    assert sorted(done) == sorted(f"s{i}" for i in range(16))
    st = engine.stats()
    assert st.num_blocks == 256 and st.num_free_blocks == 256 and len(st.per_engine) == 2
    assert st.num_running == st.num_waiting == 0 and client.where("s0") is None
    engine.check_invariants()


def test_a_shared_prefix_goes_to_the_core_that_cached_it(llm):
    engine, client = llm.engine, llm.engine.client
    prefix = random_prompts(1, seed=2, lo=80, hi=80)[0]  # 5 full blocks
    tails = random_prompts(4, seed=3, lo=3, hi=9)
    engine.add_request("first", {"prompt_token_ids": prefix + tails[0]}, greedy(4))
    core = client.where("first")
    run_all(engine)
    hits_before = [s.prefix_cache_hits for s in engine.stats().per_engine]

    # A later request with the same prefix, added together with two that share nothing: it follows the prefix.
    others = random_prompts(2, seed=4)
    engine.add_requests([engine.make_request({"prompt_token_ids": others[0]}, greedy(4), "other0"),
                         engine.make_request({"prompt_token_ids": prefix + tails[1]}, greedy(4), "second"),
                         engine.make_request({"prompt_token_ids": others[1]}, greedy(4), "other1")])
    assert client.where("second") == core
    run_all(engine)
    hits = [s.prefix_cache_hits - b for s, b in zip(engine.stats().per_engine, hits_before)]
    assert hits[core] >= 80 and hits[1 - core] == 0, hits

    # Two new requests that share a prefix and are added together land together, on the less loaded core.
    fresh = random_prompts(1, seed=5, lo=48, hi=48)[0]
    engine.add_request("busy", {"prompt_token_ids": others[0]}, greedy(200))
    busy = client.where("busy")
    engine.add_requests([engine.make_request({"prompt_token_ids": fresh + t}, greedy(4), f"pair{i}")
                         for i, t in enumerate(tails[2:])])
    assert client.where("pair0") == client.where("pair1") == 1 - busy
    engine.abort_request("busy")
    run_all(engine)


def test_an_abort_reaches_the_core_that_runs_the_request(llm):
    engine, client = llm.engine, llm.engine.client
    prompts = random_prompts(6, seed=6)
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", {"prompt_token_ids": p}, greedy(300 if i == 3 else 10))
    victim_core = client.where("a3")
    assert {client.where(f"a{i}") for i in range(6)} == {0, 1}
    for _ in range(3):
        engine.step()
    engine.abort_request("a3")
    done = run_all(engine)
    assert done["a3"].outputs[0].finish_reason == "abort"
    assert all(done[f"a{i}"].outputs[0].finish_reason == "length" for i in range(6) if i != 3)
    # Had the abort missed its core, a3 would still be running there for ~290 more steps.
    st = engine.stats().per_engine[victim_core]
    assert st.num_running == st.num_waiting == 0 and st.num_free_blocks == st.num_blocks


def test_metrics_show_each_core(llm):
    from pagedllm.metrics import ServerMetrics

    metrics = ServerMetrics("tiny")
    metrics.on_step(llm.engine.stats())
    text = metrics.render().decode()
    for i in (0, 1):
        assert f'pagedllm_engine_kv_cache_usage_perc{{engine="{i}",model_name="tiny"}}' in text


def test_a_killed_core_fails_requests_and_health_says_503(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=BLOCK,
                                    data_parallel_size=2))
    try:
        with BackgroundServer(build_app(engine, ["tiny"])) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            results = {}

            def post(name, prompt):
                results[name] = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 400, "ignore_eos": True})

            threads = [threading.Thread(target=post, args=(f"r{i}", p)) for i, p in enumerate(random_prompts(2, seed=7))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(s.num_running == 0 for s in engine.stats().per_engine):
                time.sleep(0.05)  # one request on each core
            assert all(s.num_running == 1 for s in engine.stats().per_engine)
            os.kill(engine.client.infos[1].pid, signal.SIGKILL)
            deadline = time.monotonic() + 25  # below the client's timeout: a hang shows as a live thread
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            assert not any(t.is_alive() for t in threads), "a request hung after a core died"
            for r in results.values():  # the survivor's request too: the engine is dead once any core is
                assert r.status_code == 503 and "core 1 of 2" in r.json()["error"]["message"]
            health = http.get("/health")
            assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
            assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503
        with pytest.raises(EngineDeadError):
            engine.add_request("late", "hello", greedy(2))
    finally:
        engine.shutdown()


def test_the_books_forget_requests_of_several_sequences_once_all_end(llm):
    engine, client = llm.engine, llm.engine.client
    prompts = random_prompts(3, seed=8)
    engine.add_request("n3", {"prompt_token_ids": prompts[0]}, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=5))
    engine.add_request("cut", {"prompt_token_ids": prompts[1]}, SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=50))
    engine.add_request("two", {"prompt_token_ids": prompts[2]}, SamplingParams(n=2, max_tokens=5))
    engine.step()
    engine.abort_request("cut")
    done = run_all(engine)
    assert [c.finish_reason for c in done["n3"].outputs] == ["length"] * 3
    assert [c.finish_reason for c in done["cut"].outputs] == ["abort"] * 2
    assert all(client.where(r) is None for r in ("n3", "cut", "two"))
    assert all(load.requests == load.waiting_tokens == 0 for load in client._loads)
