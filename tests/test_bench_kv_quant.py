"""benchmarks/kv_quality.py and benchmarks/decode_attention.py on tiny settings."""

from __future__ import annotations

import json
import math
import statistics

import pytest


def per_unit(amount: float, rounded: float, half_step: float) -> tuple[float, float]:
    """The range of amount / x for every x that rounds to `rounded` (a figure computed before its divisor was rounded)."""
    return amount / (rounded + half_step), amount / max(rounded - half_step, 1e-12)


def test_kv_quality_compares_an_int8_cache_with_the_models_own(tiny_model_dir, tmp_path):
    from benchmarks import kv_quality

    out = tmp_path / "q.json"
    assert kv_quality.main(["--model", tiny_model_dir, "--max-tokens", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["base_kv"], r["quantized_kv"]) == ("bfloat16", "int8")
    ll = r["log_likelihood"]
    assert ll["base"]["tokens"] == ll["quantized"]["tokens"] > 1000 and ll["base"]["nll_per_token"] > 0
    assert len(ll["per_text_relative_difference"]) == 16
    # The summary figures follow from the reported ones (up to their rounding).
    for side in ("base", "quantized"):
        assert ll[side]["perplexity"] == pytest.approx(math.exp(ll[side]["nll_per_token"]), rel=1e-4)
    assert ll["relative_difference"] == pytest.approx(ll["quantized"]["nll_per_token"] / ll["base"]["nll_per_token"] - 1, abs=1e-4)
    g = r["greedy"]
    assert g["prompts"] == 48 and 0 <= g["identical"] <= 48 and len(g["first_differences"]) == 48 - g["identical"]
    assert len(g["output_tokens"]) == 48 and all(1 <= n <= 4 for n in g["output_tokens"])  # --max-tokens 4
    assert all(0 <= k <= 4 for k in g["first_differences"])
    assert g["mean_first_difference"] == (round(statistics.mean(g["first_differences"]), 2) if g["first_differences"] else None)


def test_decode_attention_times_both_pools(tmp_path):
    from benchmarks import decode_attention
    from pagedllm.model.attention.cpu_backend import CpuPagedAttention

    if not CpuPagedAttention.available():
        pytest.skip("CPU kernels did not build")
    import torch

    from pagedllm.kernels.cpu import attention as cpu_kernels

    if not cpu_kernels.supports(torch.bfloat16, torch.int8, 64):
        pytest.skip("the int8 decode kernel needs AVX-512 (int8 pools use the torch path elsewhere)")
    out = tmp_path / "d.json"
    assert decode_attention.main(["--seqs", "4", "--context", "40", "--layers", "2", "--repeat", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["bfloat16"]["ms_per_layer"] > 0 and r["int8"]["ms_per_layer"] > 0
    assert r["int8_speedup"] == round(r["bfloat16"]["ms_per_layer"] / r["int8"]["ms_per_layer"], 3)
    # What one layer reads: 4 sequences x 40 tokens x 3 KV heads, keys and values of 64 (+ 2 scale bytes in int8).
    assert r["bfloat16"]["bytes_per_layer"] == 4 * 40 * 3 * 64 * 2 * 2
    assert r["int8"]["bytes_per_layer"] == 4 * 40 * 3 * (64 + 2) * 2
    for pool in ("bfloat16", "int8"):
        f = r[pool]
        assert len(f["runs_ms"]) == 1 and f["ms_per_layer"] == f["runs_ms"][0]  # --repeat 1: the median is the run
        lo, hi = per_unit(f["bytes_per_layer"] / 1e6, f["ms_per_layer"], 5e-5)  # ms is rounded to 4 places
        assert lo - 0.005 <= f["gb_per_s"] <= hi + 0.005
