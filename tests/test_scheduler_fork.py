"""Parallel sampling in the scheduler alone: who samples the prompt's last logits, and the fork in update()."""

from __future__ import annotations

from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import FinishReason, Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerConfig
from pagedllm.sampling_params import SamplingParams


def test_a_prompt_done_forks_its_children_in_update():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=6, max_model_len=64), kv)
    parent = Request("p", list(range(10)), SamplingParams(n=3, seed=5, max_tokens=2, ignore_eos=True))
    assert [c.request_id for c in parent.children] == ["p#0", "p#1", "p#2"] and [c.seed for c in parent.children] == [5, 6, 7]
    sched.add_request(parent)

    out = sched.schedule()  # a prompt chunk: nobody samples
    assert [(s.num_new_tokens, s.needs_sample, s.sample_seqs) for s in out.scheduled] == [(6, False, ())]
    sched.update_after_step(out)
    assert sched.update([]) == []

    out = sched.schedule()  # the rest of the prompt: its three children sample its last logits, one row each
    (s,) = out.scheduled
    assert s.request is parent and s.needs_sample and s.sample_seqs == tuple(parent.children)
    sched.update_after_step(out)
    reasons = sched.update([(c, 100 + c.index) for c in parent.children])
    assert reasons == [None, None, None]
    assert parent.finish_reason is FinishReason.STOP and sched.running == parent.children
    assert all(c.status is RequestStatus.RUNNING and c.num_computed_tokens == 10 for c in parent.children)
    assert [c.output_token_ids for c in parent.children] == [[100], [101], [102]]
    shared = kv.get_block_table("p#0")
    assert all(kv.get_block_table(c.request_id) == shared for c in parent.children)  # forked: the same blocks
    assert all(kv.pool.ref_cnt[b] == 3 for b in shared)
    kv.check_invariants()

    out = sched.schedule()  # each child decodes its own token: one row for itself
    assert [s.sample_seqs for s in out.scheduled] == [(c,) for c in parent.children]
    assert len(out.block_copies) == 2  # two of three write into the shared partial block: copies first
    sched.update_after_step(out)
    assert sched.update([(c, 7) for c in parent.children]) == [FinishReason.LENGTH] * 3
    assert not sched.has_unfinished_requests() and kv.num_free_blocks == 16
    kv.check_invariants()
