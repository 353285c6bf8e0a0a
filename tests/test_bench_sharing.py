"""benchmarks/sharing.py on a tiny workload with the tiny random-weight model: the figures are sane."""

from __future__ import annotations

import pytest

from benchmarks import sharing

TINY = dict(dtype="float32", num_kv_blocks=256, use_tqdm=False)


@pytest.mark.parametrize("repeat", [1, 2])
def test_prefix_caching_is_faster_and_changes_no_output(tiny_model_dir, repeat):
    r = sharing.bench_prefix(tiny_model_dir, num_requests=3, prefix_len=48, tail_len=8, output_len=4,
                             max_num_batched_tokens=56, repeat=repeat, **TINY)
    on, off = r["caching_on"], r["caching_off"]
    assert r["speedup"] > 0 and on["elapsed_s"] > 0 and off["elapsed_s"] > 0
    assert r["outputs_identical"] is True and r["num_identical_outputs"] == 3 * repeat
    if repeat > 1:  # each round has its own prefix: the figures below hold for every round
        assert len(on["elapsed_s_all"]) == len(off["elapsed_s_all"]) == repeat
    # 56 tokens per step: the first prompt (56 tokens) is computed alone, so the other two find its 3 prefix blocks.
    assert (on["prefix_cache_queries"], on["prefix_cache_hits"]) == (3 * 56, 2 * 48)
    assert on["prompt_tokens_computed"] == 3 * 56 - 2 * 48 < off["prompt_tokens_computed"] == 3 * 56
    assert on["preemptions"] == off["preemptions"] == 0


def test_parallel_sampling_peaks_below_private_copies(tiny_model_dir):
    r = sharing.bench_parallel(tiny_model_dir, num_prompts=3, input_len=(20, 60), output_len=4, n=4, **TINY)
    assert 0 < r["peak_blocks_shared"] < r["peak_blocks_unshared"]
    assert 0 < r["saving_pct"] < 100
    assert r["no_preemptions"] and r["all_blocks_freed"]
    # The unshared run holds 4 private copies of every prompt at its peak, at most.
    blocks = [-(-(t + 4) // 16) for t in r["prompt_tokens"]]
    assert r["peak_blocks_unshared"] <= 4 * sum(blocks)


def test_beam_search_peaks_below_private_copies(tiny_model_dir):
    r = sharing.bench_beam(tiny_model_dir, num_prompts=2, input_len=(20, 60), output_len=4, beam_width=4, **TINY)
    assert 0 < r["peak_blocks_shared"] < r["peak_blocks_unshared"]
    assert r["no_preemptions"]

