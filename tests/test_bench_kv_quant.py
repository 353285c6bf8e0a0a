"""benchmarks/kv_quality.py and benchmarks/decode_attention.py on tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def test_kv_quality_compares_an_int8_cache_with_the_models_own(tiny_model_dir, tmp_path):
    import kv_quality

    out = tmp_path / "q.json"
    assert kv_quality.main(["--model", tiny_model_dir, "--max-tokens", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["base_kv"], r["quantized_kv"]) == ("bfloat16", "int8")
    ll = r["log_likelihood"]
    assert ll["base"]["tokens"] == ll["quantized"]["tokens"] > 1000 and ll["base"]["nll_per_token"] > 0
    assert len(ll["per_text_relative_difference"]) == 16
    g = r["greedy"]
    assert g["prompts"] == 48 and 0 <= g["identical"] <= 48 and len(g["first_differences"]) == 48 - g["identical"]


def test_decode_attention_times_both_pools(tmp_path):
    import decode_attention
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
    assert r["bfloat16"]["ms_per_layer"] > 0 and r["int8"]["ms_per_layer"] > 0 and r["int8_speedup"] > 0
    assert r["int8"]["bytes_per_layer"] < 0.55 * r["bfloat16"]["bytes_per_layer"]
