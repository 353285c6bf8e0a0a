"""benchmarks/sharing.py on a tiny workload with the tiny random-weight model: the counts are the workload's,
and the ratios follow from the reported figures."""

from __future__ import annotations

import pytest

from benchmarks import sharing

TINY = dict(dtype="float32", num_kv_blocks=256, use_tqdm=False)


def per_unit(amount: float, rounded: float, half_step: float) -> tuple[float, float]:
    """The range of amount / x for every x that rounds to `rounded` (a figure computed before its divisor was rounded)."""
    return amount / (rounded + half_step), amount / max(rounded - half_step, 1e-12)


@pytest.mark.parametrize("repeat", [1, 2])
def test_prefix_caching_is_faster_and_changes_no_output(tiny_model_dir, repeat):
    r = sharing.bench_prefix(tiny_model_dir, num_requests=3, prefix_len=48, tail_len=8, output_len=4,
                             max_num_batched_tokens=56, repeat=repeat, **TINY)
    on, off = r["caching_on"], r["caching_off"]
    assert on["elapsed_s"] > 0 and off["elapsed_s"] > 0
    assert r["speedup"] == round(off["elapsed_s"] / on["elapsed_s"], 2)
    assert r["outputs_identical"] is True and r["num_identical_outputs"] == 3 * repeat
    for f in (on, off):  # 3 requests of 4 tokens each, every one counted once
        lo, hi = per_unit(3 * 4, f["elapsed_s"], 5e-4)  # elapsed_s is rounded to 3 places
        assert lo - 0.05 <= f["output_tokens_per_s"] <= hi + 0.05
    if repeat > 1:  # each round has its own prefix: the figures below hold for every round; the best round is reported
        assert len(on["elapsed_s_all"]) == len(off["elapsed_s_all"]) == repeat
        assert on["elapsed_s"] == min(on["elapsed_s_all"]) and off["elapsed_s"] == min(off["elapsed_s_all"])
    # 56 tokens per step: the first prompt (56 tokens) is computed alone, so the other two find its 3 prefix blocks.
    assert (on["prefix_cache_queries"], on["prefix_cache_hits"]) == (3 * 56, 2 * 48)
    assert on["prompt_tokens_computed"] == 3 * 56 - 2 * 48 < off["prompt_tokens_computed"] == 3 * 56
    assert on["preemptions"] == off["preemptions"] == 0


def test_parallel_sampling_peaks_below_private_copies(tiny_model_dir):
    r = sharing.bench_parallel(tiny_model_dir, num_prompts=3, input_len=(20, 60), output_len=4, n=4, **TINY)
    assert 0 < r["peak_blocks_shared"] < r["peak_blocks_unshared"]
    assert r["saving_pct"] == round(100 * (1 - r["peak_blocks_shared"] / r["peak_blocks_unshared"]), 1)
    assert 0 < r["saving_pct"] < 100
    assert r["no_preemptions"] and r["all_blocks_freed"]
    assert len(r["prompt_tokens"]) == 3 and all(20 <= t <= 60 for t in r["prompt_tokens"])
    assert 0 <= r["identical_samples"] <= 3 * 4
    # The unshared run holds 4 private copies of every prompt at its peak, at most.
    blocks = [-(-(t + 4) // 16) for t in r["prompt_tokens"]]
    assert r["peak_blocks_unshared"] <= 4 * sum(blocks)


def test_beam_search_peaks_below_private_copies(tiny_model_dir):
    r = sharing.bench_beam(tiny_model_dir, num_prompts=2, input_len=(20, 60), output_len=4, beam_width=4, **TINY)
    assert 0 < r["peak_blocks_shared"] < r["peak_blocks_unshared"]
    assert r["saving_pct"] == round(100 * (1 - r["peak_blocks_shared"] / r["peak_blocks_unshared"]), 1)
    assert r["no_preemptions"]
    assert r["best_beam_output_tokens"] == [4, 4]  # ignore_eos: every prompt's best beam runs to max_tokens

