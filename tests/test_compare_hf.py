"""benchmarks/compare_hf.py on the tiny random-weight model: three sides, consistent counts, same greedy outputs in fp32."""

from __future__ import annotations

import json

import pytest

from benchmarks import compare_hf
from pagedllm.entrypoints.bench.workload import make_workload

TINY_VOCAB = 49152  # conftest's tiny_model_dir


def test_three_sides_agree_in_float32(tiny_model_dir, tmp_path):
    pytest.importorskip("psutil", reason="transformers' continuous batching reads the CPU's RAM through psutil")
    out = tmp_path / "figures.json"
    compare_hf.main(["--model", tiny_model_dir, "--num-requests", "3", "--input-len", "8:24", "--output-len", "4:8",
                     "--dtype", "float32", "--batch-size", "2", "--kv-cache-memory", "4MiB",
                     "--max-num-batched-tokens", "256", "--json", str(out)])
    r = json.loads(out.read_text())
    assert list(r["sides"]) == ["pagedllm", "static", "cb"]
    # The token counts are the workload's own, request for request.
    prompts, out_lens = make_workload(3, (8, 24), (4, 8), TINY_VOCAB, r["workload"]["seed"])
    assert r["num_requests"] == 3 and r["input_tokens"] == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert r["output_tokens"] == sum(out_lens)
    for side, f in r["sides"].items():
        assert f["output_tokens"] == r["output_tokens"], side
        assert f["elapsed_s"] > 0
        assert f["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / f["elapsed_s"], rel=0.02)
        assert f["total_tokens_per_s"] == pytest.approx((r["input_tokens"] + r["output_tokens"]) / f["elapsed_s"], rel=0.02)
        assert f["requests_per_s"] == pytest.approx(3 / f["elapsed_s"], rel=0.02)
    assert r["sides"]["static"]["identical_to_pagedllm"] == r["sides"]["cb"]["identical_to_pagedllm"] == 3
    # The static batches ran to their longest request; the extra tokens are computed but not counted as output.
    assert r["sides"]["static"]["settings"]["computed_output_tokens"] >= r["output_tokens"]
    cb = r["sides"]["cb"]["settings"]
    assert cb["max_batch_tokens"] == 256 and cb["num_blocks"] >= 1 and cb["attn_implementation"] == "sdpa"
    # Each ratio is the two sides' reported output tokens/s, divided.
    tps = {side: f["output_tokens_per_s"] for side, f in r["sides"].items()}
    assert r["ratios"] == {f"pagedllm/{s}": round(tps["pagedllm"] / tps[s], 3) for s in ("static", "cb")}
    shown = compare_hf.table(r)
    assert all(f"{name} (output tok/s): {v:.2f}x" in shown for name, v in r["ratios"].items())


def test_unknown_side_is_refused():
    with pytest.raises(ValueError, match="sides must be some of"):
        compare_hf.compare(sides=["pagedllm", "vllm"])


def test_repeated_runs_report_each_sides_median(tiny_model_dir):
    r = compare_hf.compare(tiny_model_dir, sides=["pagedllm", "static"], num_requests=2, input_len=(8, 12),
                           output_len=(3, 5), dtype="float32", batch_size=2, kv_cache_memory="4MiB",
                           max_num_batched_tokens=256, repeat=3, use_tqdm=False)
    assert r["repeat"] == 3
    for f in r["sides"].values():
        runs = f["runs_elapsed_s"]
        assert len(runs) == 3 and f["elapsed_s"] == pytest.approx(sorted(runs)[1], abs=1e-3)
    assert "median of 3 runs" in compare_hf.table(r)
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        compare_hf.compare(tiny_model_dir, sides=["pagedllm"], repeat=0)
