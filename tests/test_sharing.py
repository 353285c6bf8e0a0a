"""Memory sharing end to end: prefix caching and parallel sampling (fork + copy-on-write)."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def shared_prefix_prompts() -> list[dict]:
    rng = random.Random(11)
    base = [rng.randrange(3, 49000) for _ in range(80)]
    tail = lambda n: [rng.randrange(3, 49000) for _ in range(n)]  # noqa: E731
    prompts = [
        base[:37] + tail(9),  # shares 37 tokens: partway into the third block of 16
        base[:37] + tail(20),
        base[:32],  # ends exactly on a block boundary
        base[:48],  # the same, one block further
        base[:32],  # a duplicate of an earlier prompt
        base[:64] + tail(3),
        tail(30),  # shares nothing
    ]
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    opts = dict(dtype="float32", num_kv_blocks=256, block_size=16, max_num_batched_tokens=128)
    return LLM(tiny_model_dir, **opts), LLM(tiny_model_dir, enable_prefix_caching=False, **opts)


def test_outputs_identical_with_prefix_caching_on_and_off(llms):
    on, off = llms
    prompts = shared_prefix_prompts()
    want = ids(off.generate(prompts, greedy(16), use_tqdm=False))
    # In one batch (hits only from prompts computed in earlier steps), then again (hits from freed, cached blocks).
    assert ids(on.generate(prompts, greedy(16), use_tqdm=False)) == want
    assert ids(on.generate(prompts, greedy(16), use_tqdm=False)) == want
    # One at a time: every later prompt finds its shared prefix.
    assert [ids(on.generate(p, greedy(16), use_tqdm=False))[0] for p in prompts] == want
    st_on, st_off = on.stats(), off.stats()
    assert st_on.prefix_cache_hits > 0 and st_off.prefix_cache_hits == 0
    assert st_on.num_free_blocks == st_on.num_blocks and st_off.num_free_blocks == st_off.num_blocks


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16))
    prompt = {"prompt_token_ids": list(range(100, 148))}  # 48 tokens: three full blocks
    for _ in range(2):
        engine.add_request(None, prompt, greedy(2))
        while engine.has_unfinished_requests():
            engine.step()
    st = engine.stats()
    # The second lookup finds two blocks; the third holds the last token, which must be computed.
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (96, 32)


def test_cached_blocks_are_evicted_least_recently_used_first_and_stay_correct(tiny_model_dir):
    """A pool too small to keep every prefix: old cached blocks are reused, outputs stay right."""
    small = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=24, block_size=8, max_model_len=160)
    big = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=8, enable_prefix_caching=False)
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 60) for _ in range(rng.randint(10, 60))]} for _ in range(12)]
    for round_ in range(2):
        assert ids(small.generate(prompts, greedy(8), use_tqdm=False)) == ids(big.generate(prompts, greedy(8), use_tqdm=False))
    st = small.stats()
    assert st.num_cached_blocks <= st.num_blocks and st.num_free_blocks == st.num_blocks
    small.engine.check_invariants()


def test_parallel_sampling_forks_the_prompt_and_copies_on_write(tiny_model_dir):
    """Each of n seeded samples equals a lone request with that sample's seed: the shared, partly
    filled last prompt block was copied before each sequence wrote into it."""
    engine_opts = dict(dtype="float32", num_kv_blocks=128, block_size=16)
    llm = LLM(tiny_model_dir, **engine_opts)
    prompt = {"prompt_token_ids": [random.Random(4).randrange(3, 49000) for _ in range(21)]}  # 21: a partial block
    params = SamplingParams(n=4, temperature=3.0, seed=77, max_tokens=12, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and out.finished
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) > 1, "the n samples should differ"
    for i, sample in enumerate(samples):
        alone = llm.generate(prompt, SamplingParams(temperature=3.0, seed=77 + i, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == sample
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples  # reproducible with a seed
    st = llm.stats()
    assert st.num_free_blocks == st.num_blocks
    llm.engine.check_invariants()


def test_parallel_sampling_shares_prompt_blocks(tiny_model_dir):
    # In this process, so that the core steps only when asked to (a core process runs ahead on its own).
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=16, core_process=False))
    prompt = {"prompt_token_ids": list(range(200, 300))}  # 100 tokens: 6 full blocks and a partial one
    engine.add_request("p", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=3, ignore_eos=True))
    engine.step()  # the prompt, then the fork
    # Four sequences share the 7 prompt blocks; nobody has written yet, so nothing was copied.
    assert engine.stats().num_used_blocks == 7
    engine.step()  # each writes its first token into the shared partial block: 3 copies, the last keeps the original
    assert engine.stats().num_used_blocks == 7 + 3
    engine.check_invariants()


def test_parallel_sampling_greedy_equals_n1_and_abort_frees_everything(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=128)
    prompt = {"prompt_token_ids": list(range(500, 530))}
    one = llm.generate(prompt, greedy(10), use_tqdm=False)[0].outputs[0].token_ids
    many = llm.generate(prompt, greedy(10, n=3), use_tqdm=False)[0]
    assert [c.token_ids for c in many.outputs] == [one] * 3
    engine = llm.engine
    engine.add_request("x", prompt, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("x")
    assert engine.stats().num_used_blocks == 0
    outs = engine.step()
    assert len(outs) == 1 and outs[0].finished and [c.finish_reason for c in outs[0].outputs] == ["abort"] * 3
    engine.check_invariants()
