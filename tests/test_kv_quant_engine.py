"""The engine on an int8 KV cache: more blocks in the same memory, and everything that works on a bf16 cache works on it."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, BeamSearchParams, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig


def prompts(n: int, lo: int, hi: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def int8_llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="bfloat16", kv_cache_dtype="int8", num_kv_blocks=400, block_size=16, core_process=False)


def test_the_same_memory_holds_about_twice_the_tokens():
    # The default model's shape (head size 64), with random weights: a token-head takes 64 + 2 bytes against 128.
    opts = dict(load_format="dummy", dtype="bfloat16", kv_cache_memory="64MiB", max_model_len=256, core_process=False)
    bf16, int8 = LLM(**opts), LLM(kv_cache_dtype="int8", **opts)
    assert int8.stats().num_blocks >= 1.9 * bf16.stats().num_blocks
    assert int8.stats().kv_cache_tokens == int8.stats().num_blocks * 16
    assert int8.engine.info.kv_cache_dtype == "int8" and bf16.engine.info.kv_cache_dtype == "bfloat16"


def test_preemption_and_a_tiny_pool_give_the_same_tokens(tiny_model_dir, int8_llm):
    ps = prompts(10, 20, 60, seed=2)
    reference = int8_llm.generate(ps, greedy(30), use_tqdm=False)
    small = LLM(tiny_model_dir, dtype="bfloat16", kv_cache_dtype="int8", num_kv_blocks=14, block_size=8, max_model_len=112)
    outs = small.generate(ps, greedy(30), use_tqdm=False)
    assert small.stats().num_preemptions > 0
    assert ids(outs) == ids(reference)
    small.engine.check_invariants()


def test_prefix_caching_reuses_quantized_blocks_and_changes_nothing(tiny_model_dir, int8_llm):
    shared = list(range(300, 348))  # three full blocks
    ps = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in prompts(4, 3, 20, seed=3)]
    off = LLM(tiny_model_dir, dtype="bfloat16", kv_cache_dtype="int8", num_kv_blocks=400, enable_prefix_caching=False, core_process=False)
    want = ids(off.generate(ps, greedy(12), use_tqdm=False))
    before = int8_llm.stats().prefix_cache_hits
    got = [ids(int8_llm.generate(p, greedy(12), use_tqdm=False))[0] for p in ps]
    assert got == want and int8_llm.stats().prefix_cache_hits > before


def test_forks_copy_on_write_and_beam_search(int8_llm):
    p = {"prompt_token_ids": list(range(500, 530))}  # a partial last block: the forks copy it on their first write
    one = ids(int8_llm.generate(p, greedy(10), use_tqdm=False))[0][0]
    many = ids(int8_llm.generate(p, greedy(10, n=3), use_tqdm=False))[0]
    assert many == [one] * 3
    beams = int8_llm.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=8))[0].sequences
    assert len(beams) == 3 and beams[0].output_token_ids == one[:8]
    int8_llm.engine.check_invariants()
    st = int8_llm.stats()
    assert st.num_free_blocks == st.num_blocks


def test_invariants_hold_after_every_step_of_a_randomized_run(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="bfloat16", kv_cache_dtype="int8", num_kv_blocks=40, block_size=4,
                                    max_model_len=160, max_num_batched_tokens=64, max_num_seqs=6, core_process=False))
    rng = random.Random(5)
    ps = prompts(25, 1, 90, seed=3)
    finished, added = {}, []
    while ps or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if ps:
                params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 30), seed=rng.randint(0, 9),
                                        n=rng.choice([1, 1, 2]))
                added.append(engine.add_request(None, ps.pop(), params))
        if rng.random() < 0.05 and engine.output_processor.requests:
            engine.abort_request(rng.choice(list(engine.output_processor.requests)))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        engine.check_invariants()
    assert sorted(finished) == sorted(added)
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_preemptions > 0
