"""benchmarks/compare_vllm.py and benchmarks/transport.py on tiny settings (vLLM is not installed in CI: that side is skipped)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import compare_vllm, transport
from pagedllm.entrypoints.bench.workload import make_workload

TINY_VOCAB = 49152  # conftest's tiny_model_dir


def per_unit(amount: float, rounded: float, half_step: float) -> tuple[float, float]:
    """The range of amount / x for every x that rounds to `rounded` (a figure computed before its divisor was rounded)."""
    return amount / (rounded + half_step), amount / max(rounded - half_step, 1e-12)


def test_pagedllm_side_offline_and_served_with_a_missing_vllm_skipped(tiny_model_dir, tmp_path):
    out = tmp_path / "figures.json"
    compare_vllm.main(["--model", tiny_model_dir, "--dtype", "float32", "--num-requests", "4", "--input-len", "8:16",
                       "--output-len", "4:8", "--rates", "20", "--repeat", "2", "--vllm-venv", str(tmp_path / "no-venv"),
                       "--json", str(out)])
    r = json.loads(out.read_text())
    assert "vllm" in r["skipped"] and list(r["runs"]) == ["pagedllm"]
    runs = r["runs"]["pagedllm"]
    assert len(runs["offline"]) == len(runs["served"]) == 2
    # Every run does the workload's work: each request run to its own length, every token counted once.
    _, lens = make_workload(4, (8, 16), (4, 8), TINY_VOCAB, r["workload"]["seed"])
    for run in runs["offline"] + [s["w48"] for s in runs["served"]]:
        assert run["output_tokens"] == sum(lens)
        lo, hi = per_unit(run["output_tokens"], run["elapsed_s"], 5e-4)  # elapsed_s is rounded to 3 places
        assert lo - 0.05 <= run["output_tokens_per_s"] <= hi + 0.05
    # The summary is the medians of the runs above, and its ratio is theirs.
    s = r["summary"]["pagedllm"]
    assert s["offline_runs_tok_s"] == [run["output_tokens_per_s"] for run in runs["offline"]]
    assert s["offline_tok_s"] == statistics.median(s["offline_runs_tok_s"]) > 0
    assert s["served_w48_tok_s"] == statistics.median(run["w48"]["output_tokens_per_s"] for run in runs["served"]) > 0
    assert s["served_over_offline"] == round(s["served_w48_tok_s"] / s["offline_tok_s"], 3)
    rate = s["rates"]["20.0"]
    assert rate["p99_ttft_ms"] >= rate["median_ttft_ms"] > 0 and rate["median_itl_ms"] > 0
    assert rate["median_ttft_ms"] == statistics.median(run["rates"]["20.0"]["median_ttft_ms"] for run in runs["served"])
    assert "ratios_pagedllm_over_vllm" not in r["summary"]


def test_transport_measures_what_is_installed(tmp_path):
    out = tmp_path / "t.json"
    assert transport.main(["--rounds", "20", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["serialize_us"]["pickle"]["step_us"] > 0 and r["round_trip_us"]["socketpair"] > 0
    # The payload sent round is the pickled step message of --requests outputs, the one serialize() measures.
    assert r["requests"] == len(transport.step_message(48).outputs) == 48
    assert r["payload_bytes"] == r["serialize_us"]["pickle"]["step_bytes"] > 48 * 32


def test_engine_thread_runs_both_sides(tiny_model_dir, tmp_path):
    from benchmarks import engine_thread

    out = tmp_path / "e.json"
    assert engine_thread.main(["--model", tiny_model_dir, "--dtype", "float32", "--num-requests", "3", "--repeat", "1",
                               "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["main"]["median_tok_s"] > 0 and r["thread"]["median_tok_s"] > 0
    assert len(r["main"]["runs_tok_s"]) == len(r["thread"]["runs_tok_s"]) == 1
    assert r["main"]["median_tok_s"] == pytest.approx(r["main"]["runs_tok_s"][0], abs=0.1)
    assert r["thread_over_main"] == round(r["thread"]["median_tok_s"] / r["main"]["median_tok_s"], 3)
