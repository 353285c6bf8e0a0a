"""benchmarks/compare_vllm.py and benchmarks/transport.py on tiny settings (vLLM is not installed in CI: that side is skipped)."""

from __future__ import annotations

import json

from benchmarks import compare_vllm, transport


def test_pagedllm_side_offline_and_served_with_a_missing_vllm_skipped(tiny_model_dir, tmp_path):
    out = tmp_path / "figures.json"
    compare_vllm.main(["--model", tiny_model_dir, "--dtype", "float32", "--num-requests", "4", "--input-len", "8:16",
                       "--output-len", "4:8", "--rates", "20", "--repeat", "2", "--vllm-venv", str(tmp_path / "no-venv"),
                       "--json", str(out)])
    r = json.loads(out.read_text())
    assert "vllm" in r["skipped"] and list(r["runs"]) == ["pagedllm"]
    runs = r["runs"]["pagedllm"]
    assert len(runs["offline"]) == len(runs["served"]) == 2
    for run in runs["offline"] + [s["w48"] for s in runs["served"]]:
        assert 4 * 4 <= run["output_tokens"] <= 4 * 8 and run["output_tokens_per_s"] > 0
    # Every run does the same work: the same workload, run to its length.
    assert len({run["output_tokens"] for run in runs["offline"] + [s["w48"] for s in runs["served"]]}) == 1
    s = r["summary"]["pagedllm"]
    assert s["offline_tok_s"] > 0 and s["served_w48_tok_s"] > 0 and s["served_over_offline"] > 0
    rate = s["rates"]["20.0"]
    assert rate["p99_ttft_ms"] >= rate["median_ttft_ms"] > 0 and rate["median_itl_ms"] > 0
    assert "ratios_pagedllm_over_vllm" not in r["summary"]


def test_transport_measures_what_is_installed(tmp_path):
    out = tmp_path / "t.json"
    assert transport.main(["--rounds", "20", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["serialize_us"]["pickle"]["step_us"] > 0 and r["round_trip_us"]["socketpair"] > 0
    assert r["payload_bytes"] > 0


def test_engine_thread_runs_both_sides(tiny_model_dir, tmp_path):
    from benchmarks import engine_thread

    out = tmp_path / "e.json"
    assert engine_thread.main(["--model", tiny_model_dir, "--dtype", "float32", "--num-requests", "3", "--repeat", "1",
                               "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["main"]["median_tok_s"] > 0 and r["thread"]["median_tok_s"] > 0 and r["thread_over_main"] > 0
