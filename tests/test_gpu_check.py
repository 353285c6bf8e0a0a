"""benchmarks/gpu_check.py's dry run: every step of the GPU check, on the CPU, on tiny shapes (CI has no GPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")  # not imported here: see
def test_the_dry_run_goes_through_every_step(tmp_path):  # test_triton_attention.py on TRITON_INTERPRET
    from benchmarks import gpu_check

    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    for step in gpu_check.STEPS:
        assert "error" not in r[step], (step, r[step])
    assert r["tests"]["tests"] > 0 and r["tests"]["failures"] == r["tests"]["errors"] == 0
    case = r["decode"]["cases"][0]
    assert case["bfloat16"]["ms"] > 0 and case["int8"]["ms"] > 0 and case["sdpa_contiguous"]["ms"] > 0
    # Every side does the workload's work: each of the 8 requests to its own length, every token counted once.
    _, lens = gpu_check.workload({"lengths": [4, 12], "num_requests": 8, "vocab": r["model"]["vocab_size"]})
    for side in gpu_check.E2E_SIDES:
        assert r[side]["completed_requests"] == 8 and not r[side]["partial"] and r[side]["output_tokens"] == sum(lens), side
    assert any("KV pool" in line for line in r["pagedllm_graphs"]["startup_log"])
    assert set(r["summary"]) >= {"graphs_over_hf_continuous_batching", "graphs_over_eager", "tests"}
    # The summary's ratios are the sides' reported output tokens/s, divided; its test counts are the tests step's.
    rate = {side: r[side]["output_tok_s"] for side in gpu_check.E2E_SIDES}
    s = r["summary"]
    assert s["graphs_over_hf_continuous_batching"]["ratio"] == round(rate["pagedllm_graphs"] / rate["hf_cb"], 2)
    assert s["graphs_over_hf_static"] == round(rate["pagedllm_graphs"] / rate["hf_static"], 2)
    assert s["graphs_over_eager"]["ratio"] == round(rate["pagedllm_graphs"] / rate["pagedllm_eager"], 3)
    assert s["tests"] == {k: r["tests"][k] for k in ("tests", "failures", "errors", "skipped")}
