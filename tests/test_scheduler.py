"""The scheduler and KV cache manager on their own: plain Python, no model, no torch."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from pagedllm.engine.kv_cache import BlockPool, KVCacheManager
from pagedllm.engine.request import FinishReason, Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerConfig


class Params:
    """The few SamplingParams fields the scheduler-side code reads."""

    logprobs = None
    seed = None


def make_request(rid: str, prompt_len: int, max_tokens: int, first_token: int = 0) -> Request:
    req = Request(rid, list(range(first_token, first_token + prompt_len)), Params())
    req.max_tokens = max_tokens
    return req


def test_engine_bookkeeping_imports_no_torch():
    code = "import sys, pagedllm.engine.scheduler, pagedllm.engine.kv_cache; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_pool_reuses_oldest_freed_block_first():
    pool = BlockPool(4)
    a = pool.allocate(4)
    assert pool.num_free_blocks == 0
    for b in (a[2], a[0], a[3]):
        pool.decref(b)
    assert pool.allocate(3) == [a[2], a[0], a[3]]


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 0, 9)  # 3 blocks
    assert not kv.allocate_slots("b", 0, 8)  # needs 2, only 1 free
    assert kv.get_block_table("b") == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots("a", 9, 3)  # still 3 blocks: nothing new
    assert kv.num_free_blocks == 1
    kv.check_invariants()
    kv.free("a")
    kv.free("a")  # a second free is a no-op
    assert kv.num_free_blocks == 4
    kv.check_invariants()


def test_kv_utilization_counts_token_slots_in_allocated_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    kv.allocate_slots("a", 0, 5)  # 2 blocks, 5 of 8 slots
    kv.allocate_slots("b", 0, 4)  # 1 block, full
    st = kv.stats()
    assert (st.num_used_blocks, st.num_free_blocks, st.num_tokens) == (3, 7, 9)
    assert st.kv_utilization == pytest.approx(9 / 12)


def test_kv_utilization_counts_a_shared_block_once():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    kv.allocate_slots("a", 0, 6)  # 2 blocks, 6 of 8 slots
    kv.fork("a", "b")  # b shares both
    st = kv.stats()
    assert (st.num_used_blocks, st.num_tokens) == (2, 6) and st.kv_utilization == pytest.approx(6 / 8)
    kv.allocate_slots("b", 6, 1)  # b writes into the shared partial block: its own copy first
    st = kv.stats()
    assert (st.num_used_blocks, st.num_tokens) == (3, 4 + 2 + 3) and st.kv_utilization == pytest.approx(9 / 12)


def test_reset_prefix_cache_forgets_cached_prefixes_only_when_no_block_is_in_use():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    kv.allocate_slots("a", 0, 9)
    kv.cache_full_blocks("a", tokens, 9)
    assert kv.find_cached_prefix(tokens).blocks[0] == kv.get_block_table("a")[:2]
    assert not kv.reset_prefix_cache()  # "a" still holds its blocks
    kv.free("a")
    assert kv.find_cached_prefix(tokens).num_tokens == 2 * kv.block_size  # freed, still findable
    assert kv.reset_prefix_cache() and kv.find_cached_prefix(tokens).num_tokens == 0
    kv.check_invariants()


def run_simulation(seed: int, num_blocks: int, block_size: int, max_seqs: int, budget: int, steps_limit: int = 5000,
                   windows: tuple = (None,)):
    """Drive the scheduler as the engine does, sampling 'tokens' at random; check invariants every step.

    windows: the KV cache groups' sliding windows (None: full attention)."""
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, group_windows=windows)
    max_len = num_blocks * block_size // len(windows)
    sched = Scheduler(SchedulerConfig(max_seqs, budget, max_len), kv)
    pending = [make_request(f"r{i}", rng.randint(1, max_len // 2), rng.randint(1, 40)) for i in range(40)]
    finished: list[Request] = []
    steps = 0
    while pending or sched.has_unfinished_requests():
        steps += 1
        assert steps < steps_limit, "the scheduler stopped making progress"
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add_request(pending.pop())
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        assert len(sched.running) <= max_seqs
        assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            assert s.request.status is RequestStatus.RUNNING
            for g, table in enumerate(s.block_tables):
                assert len(table) * block_size >= s.start_pos + s.num_new_tokens
                if windows[g] is not None:  # every block that the step's first query's window reaches is held
                    first = max(0, s.start_pos - windows[g] + 1) // block_size
                    assert all(kv.pool.ref_cnt[b] > 0 for b in table[first:])
        kv.check_invariants()
        sched.update_after_step(out)
        for s in out.scheduled:
            req = s.request
            if not s.needs_sample:
                continue
            req.append_output_token(rng.randrange(1000))
            if req.num_output_tokens >= req.max_tokens or req.num_tokens >= max_len:
                sched.finish_request(req, FinishReason.LENGTH)
                finished.append(req)
        # Now and then a request is aborted, running or waiting.
        if rng.random() < 0.05 and (sched.running or sched.waiting):
            victim = rng.choice(list(sched.running) + list(sched.waiting))
            sched.finish_request(victim, FinishReason.ABORT)
            finished.append(victim)
        kv.check_invariants()
    assert len(finished) == 40 and all(r.finish_reason is not None for r in finished)
    assert kv.num_free_blocks == num_blocks
    kv.check_invariants()
    return sched


@pytest.mark.parametrize("seed", range(6))
def test_randomized_run_keeps_invariants_and_finishes_everything(seed):
    run_simulation(seed, num_blocks=64, block_size=4, max_seqs=8, budget=32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("windows", [(6,), (None, 5), (None, 9, 9)])
def test_kv_cache_groups_with_sliding_windows_keep_invariants(seed, windows):
    run_simulation(seed, num_blocks=96, block_size=4, max_seqs=8, budget=32, windows=windows)
    run_simulation(seed, num_blocks=30, block_size=4, max_seqs=16, budget=24, windows=windows)  # tight: preemptions


@pytest.mark.parametrize("seed", range(4))
def test_tight_pool_preempts_and_still_finishes_everything(seed):
    sched = run_simulation(seed, num_blocks=12, block_size=4, max_seqs=16, budget=24)
    assert sched.num_preemptions > 0


def test_preempted_request_goes_back_to_the_front_and_recomputes():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    sched = Scheduler(SchedulerConfig(8, 100, 8), kv)
    a, b = make_request("a", 4, 10), make_request("b", 4, 10, first_token=100)  # nothing shared
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    sched.update_after_step(out)
    for r in (a, b):
        r.append_output_token(7)
    # Both now need a third block; only one can have it: b, admitted last, is preempted.
    out = sched.schedule()
    assert out.preempted == ["b"] and [s.request_id for s in out.scheduled] == ["a"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and sched.waiting[0] is b
    kv.check_invariants()


def test_long_prompt_is_chunked_by_the_token_budget():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(8, 16, 256), kv)
    long, short = make_request("long", 40, 5), make_request("short", 3, 5)
    sched.add_request(long)
    sched.add_request(short)
    chunks = []
    while long.num_computed_tokens < 40:
        out = sched.schedule()
        chunks.append([(s.request_id, s.num_new_tokens, s.needs_sample) for s in out.scheduled])
        sched.update_after_step(out)
        for s in out.scheduled:
            if s.needs_sample:
                s.request.append_output_token(1)
    assert chunks[0] == [("long", 16, False)]
    assert chunks[1] == [("long", 16, False)]
    # The last chunk of the long prompt and the short prompt share a step.
    assert chunks[2] == [("long", 8, True), ("short", 3, True)]


def test_seat_budget_limits_running_requests():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(2, 1000, 256), kv)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 4, 5))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 3


def test_same_prefix_computed_twice_in_one_step_ends_up_in_one_set_of_blocks():
    """Two requests admitted together both compute a prefix; afterwards they share one copy."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(8, 100, 64), kv)
    a, b = make_request("a", 10, 5), make_request("b", 10, 5)  # same 10 tokens: two full blocks and a partial
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert kv.num_free_blocks == 16 - 6  # computed twice, in separate blocks
    sched.update_after_step(out)
    ta, tb = kv.get_block_table("a"), kv.get_block_table("b")
    assert ta[:2] == tb[:2] and ta[2] != tb[2]  # full blocks shared, the partial ones not
    assert kv.num_free_blocks == 16 - 4
    kv.check_invariants()
