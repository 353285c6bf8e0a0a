"""`pagedllm bench throughput | serve | memory` end to end on tiny workloads (the tiny random-weight model):
the figures add up to the workload, the ratios follow from the counts, the JSON parses, the plots are PNGs."""

from __future__ import annotations

import argparse
import json

import pytest

from pagedllm.entrypoints.bench.serve_metrics import RequestRecord, summarize
from pagedllm.entrypoints.bench.workload import WorkloadConfig, load_workload, make_workload, parse_range
from pagedllm.entrypoints.cli import main

VOCAB = 49152  # the tiny model's (and the default model's) vocabulary
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*argv: str) -> int:
    return main(["--log-level", "warning", "bench", *argv])


def expected(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> tuple[int, list[int]]:
    prompts, outs = make_workload(n, input_len, output_len, VOCAB, seed)
    return sum(len(p["prompt_token_ids"]) for p in prompts), outs


# --- the workload -----------------------------------------------------------


def test_the_default_workload_is_48_random_prompts_of_32_to_384_tokens():
    w = load_workload(WorkloadConfig(), VOCAB)
    assert len(w) == 48 and all(32 <= len(p["prompt_token_ids"]) <= 384 for p in w.prompts)
    assert all(32 <= n <= 192 for n in w.output_lens)
    assert all(100 <= t < VOCAB - 100 for p in w.prompts for t in p["prompt_token_ids"])
    assert load_workload(WorkloadConfig(), VOCAB).prompts == w.prompts  # seeded
    assert parse_range("64") == (64, 64) and parse_range("8:40") == (8, 40)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)


def test_a_dataset_gives_prompts_and_output_lengths_and_bad_lines_are_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hi", "output_len": 3}\n\n{"prompt_token_ids": [5, 6]}\n')
    w = load_workload(WorkloadConfig(dataset=str(f), output_len=(7, 7)), None)
    assert w.prompts == [{"prompt": "hi"}, {"prompt_token_ids": [5, 6]}] and w.output_lens == [3, 7]
    with pytest.raises(ValueError, match="holds only 2"):
        load_workload(WorkloadConfig(dataset=str(f), num_requests=5), None)
    f.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: each line must be"):
        load_workload(WorkloadConfig(dataset=str(f)), None)


def test_serving_figures_follow_vllms_definitions():
    ok = RequestRecord(True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1])
    one = RequestRecord(True, prompt_tokens=4, output_tokens=1, ttft=0.2, latency=0.2)
    f = summarize([ok, one, RequestRecord(error="HTTP 400: no")], duration=2.0)
    assert (f["completed"], f["failed"], f["total_output_tokens"], f["total_input_tokens"]) == (2, 1, 6, 14)
    assert f["request_throughput"] == 1.0 and f["output_throughput"] == 3.0 and f["total_token_throughput"] == 10.0
    assert f["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; one-token requests have no TPOT
    assert f["mean_ttft_ms"] == pytest.approx(150.0) and f["median_e2el_ms"] == pytest.approx(350.0)
    assert f["p99_itl_ms"] == pytest.approx(100.0) and f["errors"] == ["HTTP 400: no"]


# --- throughput -------------------------------------------------------------


def test_throughput_sweep_counts_the_workload_and_plots_it(tiny_model_dir, tmp_path, capsys):
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = bench("throughput", "--model", tiny_model_dir, "--dtype", "float32", "--num-requests", "5",
               "--input-len", "8:40", "--output-len", "3:9", "--concurrency", "1,5", "--json", str(out), "--plot", str(png))
    assert rc == 0
    in_tokens, outs = expected(5, (8, 40), (3, 9))
    runs = json.loads(out.read_text())["runs"]
    assert [r["max_num_seqs"] for r in runs] == [1, 5]
    for r in runs:
        assert (r["num_requests"], r["input_tokens"], r["output_tokens"]) == (5, in_tokens, sum(outs))
        assert r["requests_per_s"] == pytest.approx(5 / r["elapsed_s"], rel=0.01)
        assert r["output_tokens_per_s"] == pytest.approx(sum(outs) / r["elapsed_s"], rel=0.01)
        assert r["total_tokens_per_s"] == pytest.approx((in_tokens + sum(outs)) / r["elapsed_s"], rel=0.01)
        assert r["preemptions"] == 0
        assert r["prefix_cache_hit_tokens"] == 0  # the second run finds nothing of the first run's (or the warm-up's)
    # One at a time: a prefill step that samples the first token, then a step per further token; all at once:
    # as many steps as the longest request.
    assert runs[0]["steps"] == sum(outs) and runs[1]["steps"] == max(outs)
    assert png.read_bytes().startswith(PNG)
    assert "Output tokens/s" in capsys.readouterr().out


def test_throughput_plot_without_a_sweep_is_a_clear_error(tiny_model_dir, capsys):
    assert bench("throughput", "--model", tiny_model_dir, "--plot", "x.png") == 2
    assert "--concurrency" in capsys.readouterr().err


# --- memory -----------------------------------------------------------------


def test_memory_paged_runs_more_requests_than_contiguous_in_the_same_memory(tiny_model_dir, tmp_path, capsys):
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    rc = bench("memory", "--model", tiny_model_dir, "--dtype", "float32", "--max-model-len", "128", "--num-requests", "12",
               "--input-len", "8:60", "--output-len", "4:24", "--json", str(out), "--plot", str(png))
    assert rc == 0
    f = json.loads(out.read_text())
    _, outs = expected(12, (8, 60), (4, 24))
    p, c = f["paged"], f["contiguous"]
    assert (p["block_size"], p["num_blocks"]) == (16, 8 * 128 // 16)  # default: room for 8 requests of max_model_len
    assert (c["block_size"], c["num_blocks"]) == (128, 8)
    for s in (p, c):
        assert s["output_tokens"] == sum(outs)
        assert 0 < s["mean_kv_utilization"] <= s["peak_kv_utilization"] <= 1
        assert 0 < s["kv_utilization_at_peak_blocks"] <= 1
    samples = f["samples"]["contiguous"]
    # Contiguous: each running request holds exactly one max_model_len block, from admission to the end.
    assert samples["used_blocks"] == samples["num_running"] and c["max_running"] == 8
    assert p["max_running"] == 12 and f["running_ratio"] == pytest.approx(12 / 8, abs=0.01)
    assert p["mean_kv_utilization"] > c["mean_kv_utilization"]
    assert len(f["samples"]["paged"]["kv_utilization"]) == p["steps"]
    assert png.read_bytes().startswith(PNG)
    assert "Requests running at once, paged / contiguous" in capsys.readouterr().out


# --- serve ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from pagedllm import LLMEngine
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.server.app import build_app
    from pagedllm.entrypoints.server.background import BackgroundServer

    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))
    with BackgroundServer(build_app(engine, ["tiny"])) as srv:
        yield srv


def test_serve_counts_every_token_the_server_reports(server, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = bench("serve", "--base-url", server.url, "--tokenizer", tiny_model_dir, "--num-requests", "6",
               "--input-len", "8:40", "--output-len", "3:9", "--request-rate", "100", "--json", str(out))
    assert rc == 0
    f = json.loads(out.read_text())
    in_tokens, outs = expected(6, (8, 40), (3, 9))
    assert f["model"] == "tiny" and (f["completed"], f["failed"]) == (6, 0)
    assert (f["total_input_tokens"], f["total_output_tokens"]) == (in_tokens, sum(outs))
    assert f["request_throughput"] == pytest.approx(6 / f["duration_s"], rel=0.01)
    assert f["output_throughput"] == pytest.approx(sum(outs) / f["duration_s"], rel=0.01)
    assert 0 < f["mean_ttft_ms"] <= f["mean_e2el_ms"] and 0 < f["median_itl_ms"] and 0 < f["mean_tpot_ms"] < f["mean_e2el_ms"]
    assert f["mean_e2el_ms"] / 1000 <= f["duration_s"]
    assert "Mean TTFT (ms)" in capsys.readouterr().out


def test_serve_counts_a_rejected_request_as_failed(server, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Hello there", "output_len": 4}\n{"prompt_token_ids": [5, 999999]}\n'
                    '{"prompt_token_ids": [500, 600, 700], "output_len": 6}\n')
    out = tmp_path / "s.json"
    assert bench("serve", "--base-url", server.url, "--dataset", str(data), "--output-len", "2",
                 "--max-concurrency", "2", "--json", str(out)) == 0
    f = json.loads(out.read_text())
    assert (f["completed"], f["failed"], f["total_output_tokens"], f["max_concurrency"]) == (2, 1, 10, 2)
    assert "out of range" in f["errors"][0] and "failed: HTTP 400" in capsys.readouterr().out


def test_serve_without_a_server_says_so(capsys, tmp_path):
    assert bench("serve", "--base-url", "http://127.0.0.1:9", "--dataset", str(_one_line(tmp_path))) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def _one_line(tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text('{"prompt": "x"}\n')
    return f


def test_decode_step_times_each_batch_size_and_leaves_the_core_idle(tiny_model_dir, tmp_path):
    from benchmarks import decode_step

    out = tmp_path / "decode.json"
    figures = decode_step.main(["--model", tiny_model_dir, "--rows", "1,3", "--steps", "3", "--repeat", "2",
                                "--json", str(out)])
    assert list(figures["rows"]) == ["1", "3"]
    assert all(len(r["runs_ms"]) == 2 and r["ms_per_step"] > 0 for r in figures["rows"].values())
    assert json.loads(out.read_text())["rows"]["3"]["ms_per_step"] == figures["rows"]["3"]["ms_per_step"]


def test_kv_stats_times_the_per_step_stats_of_a_full_cache(tmp_path):
    from benchmarks import kv_stats

    out = tmp_path / "kv_stats.json"
    figures = kv_stats.main(["--requests", "6", "--calls", "3", "--json", str(out)])
    assert figures["requests"] == 6 and figures["us_per_call"] > 0
    assert figures["used_blocks"] >= figures["tokens"] / 16
    assert json.loads(out.read_text()) == figures
