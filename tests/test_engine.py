"""The engine end to end on a tiny random-weight model: batching, preemption, aborts, invariants, errors."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))]} for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=512, block_size=16, max_num_batched_tokens=256)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_batched_outputs_equal_one_at_a_time(tiny_llm):
    prompts = random_prompts(6, 3, 120, seed=1)
    batched = tiny_llm.generate(prompts, greedy(12), use_tqdm=False)
    for p, out in zip(prompts, batched):
        alone = tiny_llm.generate(p, greedy(12), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
    assert tiny_llm.stats().num_free_blocks == tiny_llm.stats().num_blocks


def test_tiny_pool_preempts_and_gives_the_same_outputs(tiny_model_dir, tiny_llm):
    prompts = random_prompts(10, 20, 60, seed=2)
    reference = tiny_llm.generate(prompts, greedy(40), use_tqdm=False)
    # 14 blocks of 8 tokens = 112 slots for ten requests of up to 100 tokens each.
    small = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=14, block_size=8, max_model_len=112)
    outs = small.generate(prompts, greedy(40), use_tqdm=False)
    st = small.stats()
    assert st.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert st.num_free_blocks == st.num_blocks and st.num_running == st.num_waiting == 0


def test_invariants_hold_after_every_step_of_a_randomized_run(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=40, block_size=4, max_model_len=160,
                                    max_num_batched_tokens=64, max_num_seqs=6))
    rng = random.Random(5)
    prompts = random_prompts(30, 1, 90, seed=3)
    finished: dict[str, str] = {}
    ids = []
    steps = 0
    while prompts or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if prompts:
                params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 30), seed=rng.randint(0, 9))
                ids.append(engine.add_request(None, prompts.pop(), params))
        if rng.random() < 0.05 and engine.output_processor.requests:
            engine.abort_request(rng.choice(list(engine.output_processor.requests)))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        engine.check_invariants()
        steps += 1
        assert steps < 3000
    assert sorted(finished) == sorted(ids)
    assert set(finished.values()) <= {"length", "stop", "abort"}
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks
    assert st.num_preemptions > 0


def test_stats_report_blocks_requests_and_utilization(tiny_model_dir):
    # In this process, so that the core steps only when asked to (a core process runs ahead on its own).
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16, core_process=False))
    for p in random_prompts(3, 20, 20, seed=4):
        engine.add_request(None, p, greedy(5))
    st = engine.stats()
    assert (st.num_waiting, st.num_running, st.num_used_blocks) == (3, 0, 0)
    engine.step()  # all three 20-token prompts: 2 blocks each, 60 of 96 slots... plus the sampled token's slot later
    st = engine.stats()
    assert (st.num_running, st.num_used_blocks, st.num_free_blocks, st.num_blocks) == (3, 6, 58, 64)
    assert st.kv_utilization == pytest.approx(60 / 96)


def test_abort_frees_blocks_at_once_and_reports_abort(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64))
    rid = engine.add_request("keep", random_prompts(1, 40, 40)[0], greedy(50))
    engine.step()
    assert engine.stats().num_used_blocks > 0
    engine.abort_request(rid)
    assert engine.stats().num_used_blocks == 0 and not engine.has_unfinished_requests()
    outs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outs] == [("keep", True, "abort")]


def test_stop_token_ids_min_tokens_and_max_model_len(tiny_llm, tiny_model_dir):
    prompt = random_prompts(1, 10, 10, seed=6)[0]
    free_run = tiny_llm.generate(prompt, greedy(20), use_tqdm=False)[0].outputs[0].token_ids
    stop_tok = free_run[5]
    first = free_run.index(stop_tok)
    out = tiny_llm.generate(prompt, greedy(20, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok and out.token_ids == free_run[: first + 1]
    out = tiny_llm.generate(prompt, greedy(20, stop_token_ids=[stop_tok], min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > first + 1
    short = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, max_model_len=16)
    out = short.generate(prompt, greedy(100), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 10


def test_logprobs_are_returned_per_token(tiny_llm):
    out = tiny_llm.generate(random_prompts(1, 8, 8)[0], greedy(4, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the top token
        assert len(entry) == 3 and all(lp.logprob <= 0 for lp in entry.values())
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llm):
    prompts = random_prompts(4, 5, 30, seed=8)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate(prompts[0], params, use_tqdm=False)[0].outputs[0].token_ids
    batched = tiny_llm.generate(prompts, [params] + [SamplingParams(temperature=1.0, max_tokens=10)] * 3, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone


def test_bad_inputs_give_clear_errors(tiny_llm, tiny_model_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        tiny_llm.generate({"prompt_token_ids": [1, 10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        tiny_llm.generate("hi", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="one per prompt"):
        tiny_llm.generate(["a", "b"], [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="lone UTF-16 surrogate \\(\\\\ud800\\) at character 3"):
        tiny_llm.generate("hi \ud800", use_tqdm=False)  # the tokenizer raised a TypeError that named no cause
    with pytest.raises(ValueError, match="the rendered chat prompt holds a lone UTF-16 surrogate"):
        tiny_llm.chat([{"role": "user", "content": "hi \udfff"}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompts must be a prompt"):
        tiny_llm.generate(5, use_tqdm=False)
    with pytest.raises(ValueError, match="list of integers, got \\[1.5, 2\\]"):
        tiny_llm.generate({"prompt_token_ids": [1.5, 2]}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams or a list of them"):
        tiny_llm.generate("hi", {"max_tokens": 3}, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(tiny_model_dir, not_an_option=1)
    with pytest.raises(ValueError, match="request of max_model_len"):
        LLM(tiny_model_dir, num_kv_blocks=2, block_size=16)
    # Nothing was left behind by the failed calls.
    assert not tiny_llm.engine.has_unfinished_requests()


def test_prompt_token_ids_may_be_an_array_or_a_tensor(tiny_llm):
    import numpy as np

    ids = [5, 17, 300, 42]
    want = tiny_llm.generate({"prompt_token_ids": ids}, greedy(4), use_tqdm=False)[0].outputs[0].token_ids
    for given in (tuple(ids), np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids)):
        out = tiny_llm.generate({"prompt_token_ids": given}, greedy(4), use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and all(type(t) is int for t in out.prompt_token_ids)
        assert out.outputs[0].token_ids == want
    with pytest.raises(ValueError, match="list of integers"):
        tiny_llm.generate({"prompt_token_ids": np.array([[5, 17]])}, use_tqdm=False)


def test_unknown_model_path_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="does not exist|not found|no such"):
        LLM(str(tmp_path / "no-such-model"))


def test_stop_string_cuts_text_and_running_text_is_never_retracted(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64))
    prompt = random_prompts(1, 12, 12, seed=9)[0]

    def run(params):
        engine.add_request("r", prompt, params)
        texts = []
        while engine.has_unfinished_requests():
            texts += [o.outputs[0] for o in engine.step()]
        return texts

    free = run(greedy(30))[-1].text
    stop = free[len(free) // 2 : len(free) // 2 + 4]
    first = free.index(stop)
    outs = run(greedy(30, stop=[stop]))
    final = outs[-1]
    assert final.finish_reason == "stop" and final.stop_reason == stop and final.text == free[:first]
    for o in outs[:-1]:
        assert final.text.startswith(o.text)  # a streaming client never sees text that is later cut


def test_prompt_logprobs_equal_transformers_through_chunks_and_a_cached_prefix(tiny_model_dir):
    """Teacher-forced logprobs of every prompt token, as vLLM returns them (None first), through prefill chunks;
    a request that asks for them computes its whole prompt even when its prefix is cached."""
    import torch
    import transformers

    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=128, max_num_batched_tokens=32)
    prompt = random_prompts(1, 90, 90, seed=11)[0]
    llm.generate(prompt, greedy(2), use_tqdm=False)  # its blocks are now in the prefix cache
    out = llm.generate(prompt, greedy(2, prompt_logprobs=3), use_tqdm=False)[0]
    ids = prompt["prompt_token_ids"]
    plp = out.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i in range(1, len(ids)):
        entry = plp[i]
        assert ids[i] in entry and 3 <= len(entry) <= 4
        assert entry[ids[i]].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert entry[ids[i]].rank == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        top = sorted(entry.values(), key=lambda lp: -lp.logprob)[0]
        assert top.logprob == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
    # The output tokens are those of a request that did not ask.
    assert out.outputs[0].token_ids == llm.generate(prompt, greedy(2), use_tqdm=False)[0].outputs[0].token_ids
