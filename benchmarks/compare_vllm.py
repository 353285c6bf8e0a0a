"""pagedllm against vLLM's CPU build on the same workload, offline and served, each side in its own process, in turn.

    python -m benchmarks.compare_vllm --repeat 2 --json compare_vllm.json

Workload (pagedllm.entrypoints.bench.workload.make_workload): 48 requests,
random-token prompts of 32..384 tokens, outputs of 32..192 tokens, greedy,
every request runs to its length (EOS ignored), seed 0. Both sides load the
same weights: the model's resolved Hugging Face directory (the embedded
default, converted from its GGUF file, unless --model), at the same --dtype.

  offline  a fresh process per run: LLM(model).generate(all 48 prompts) after
           an untimed warm-up of two short requests; output tokens / seconds.
  served   a fresh server per run (`pagedllm serve`, or vLLM's OpenAI server
           started as a module, as ../shared/peers/setup-vllm-cpu.sh says),
           then from this process:
           - W48: the 48 requests sent at once as non-streaming
             /v1/completions with token-id prompts (after a warm-up request);
             output tokens (the server's usage) / wall seconds;
           - at each --rates value (Poisson arrivals, requests/s), the same
             number of requests with other random prompts (seed 1, 2, ...: no
             prefix-cache hits from an earlier run), streamed, as
             `pagedllm bench serve` sends them: TTFT, ITL, TPOT, throughput.

The sides run one after the other, never two at once (--repeat N: every
mode of every side once per round, N rounds), and each side's median run is
reported with every run beside it. vLLM runs from the venv that
../shared/peers/setup-vllm-cpu.sh makes (--vllm-venv, default $VLLM_VENV or
/tmp/vllm-venv) with the environment its header gives (KV cache space, OpenMP
binding, tcmalloc and Intel OpenMP preloaded); a side whose venv is absent
is skipped and says so. Ratios: pagedllm / vllm for throughput, and each
side's served W48 / its offline figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pagedllm.entrypoints.bench.report import write_json  # noqa: E402

from pagedllm.entrypoints.bench.workload import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, make_workload, parse_range  # noqa: E402

SIDES = ("pagedllm", "vllm")
MODES = ("offline", "served")
DEFAULT_RATES = (2.0, 4.0, 8.0)
_RESULT = "RESULT "


# --- offline: one child process per run ----------------------------------------------
_OFFLINE_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
from pagedllm.entrypoints.bench.workload import make_workload
prompts, lens = make_workload(spec["n"], tuple(spec["input_len"]), tuple(spec["output_len"]), spec["vocab"], spec["seed"])
ids = [p["prompt_token_ids"] for p in prompts]
warm = [[100 + i for i in range(24)], [200 + i for i in range(24)]]
if spec["side"] == "pagedllm":
    from pagedllm import LLM, SamplingParams
    llm = LLM(spec["model"], dtype=spec["dtype"])
    run = lambda ps, ns: llm.generate([{"prompt_token_ids": p} for p in ps],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in ns], use_tqdm=False)
else:
    from vllm import LLM, SamplingParams
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0)
    run = lambda ps, ns: llm.generate([{"prompt_token_ids": p} for p in ps],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in ns], use_tqdm=False)
run(warm, [4, 4])
t0 = time.perf_counter()
outs = run(ids, lens)
elapsed = time.perf_counter() - t0
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT " + json.dumps({"elapsed_s": round(elapsed, 3), "output_tokens": tokens,
                              "output_tokens_per_s": round(tokens / elapsed, 1)}), flush=True)
"""


def vllm_env(venv: str) -> dict:
    """The environment ../shared/peers/setup-vllm-cpu.sh's header gives every vLLM process."""
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    preload = [p for p in ("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", os.path.join(venv, "lib", "libiomp5.so"))
               if os.path.exists(p)]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def side_python(side: str, venv: str) -> tuple[str, dict]:
    env = dict(os.environ) if side == "pagedllm" else vllm_env(venv)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return (sys.executable if side == "pagedllm" else os.path.join(venv, "bin", "python")), env


def run_offline(side: str, spec: dict, venv: str, log_dir: str, timeout: float) -> dict:
    python, env = side_python(side, venv)
    log = os.path.join(log_dir, f"{side}-offline-{time.time_ns()}.log")
    with open(log, "w") as f:
        proc = subprocess.run([python, "-c", _OFFLINE_CHILD, json.dumps({**spec, "side": side})], env=env,
                              stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"{side} offline run failed (exit {proc.returncode}); its log: {log}")


# --- served: one server process per run -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(side: str, spec: dict, venv: str, log_path: str, timeout: float) -> tuple[subprocess.Popen, str]:
    import httpx

    python, env = side_python(side, venv)
    port = _free_port()
    if side == "pagedllm":
        cmd = [python, "-m", "pagedllm.entrypoints.cli", "serve", "--model", spec["model"], "--dtype", spec["dtype"]]
    else:
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"], "--dtype", spec["dtype"], "--seed", "0"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {side} server exited with {proc.returncode} before it was ready; its log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the {side} server was not ready within {timeout:.0f}s; its log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def burst(url: str, prompts: list[list[int]], lens: list[int], timeout: float) -> dict:
    """Every request at once, non-streaming; output tokens per wall second."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(prompt, n):
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                           "temperature": 0.0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        await one(list(range(100, 108)), 4)  # warm-up
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lens))))
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": round(elapsed, 3), "output_tokens": tokens, "output_tokens_per_s": round(tokens / elapsed, 1)}


def run_served(side: str, spec: dict, rates: list[float], venv: str, log_dir: str, timeout: float) -> dict:
    from pagedllm.entrypoints.bench.serve import ServeConfig, benchmark
    from pagedllm.entrypoints.bench.workload import Workload

    log = os.path.join(log_dir, f"{side}-served-{time.time_ns()}.log")
    proc, url = start_server(side, spec, venv, log, timeout)
    try:
        prompts, lens = make_workload(spec["n"], tuple(spec["input_len"]), tuple(spec["output_len"]), spec["vocab"], spec["seed"])
        result = {"w48": asyncio.run(burst(url, [p["prompt_token_ids"] for p in prompts], lens, timeout)), "rates": {}}
        for k, rate in enumerate(rates, start=1):
            w = Workload(*make_workload(spec["n"], tuple(spec["input_len"]), tuple(spec["output_len"]), spec["vocab"], spec["seed"] + k))
            figures = asyncio.run(benchmark(ServeConfig(base_url=url, request_rate=rate, timeout_s=timeout, progress=False), w))
            if figures["failed"]:
                raise RuntimeError(f"{side} at {rate} requests/s: {figures['failed']} requests failed: {figures['errors'][:2]}")
            result["rates"][str(rate)] = {k2: figures[k2] for k2 in (
                "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms",
                "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms")}
        return result
    finally:
        stop_server(proc)


# --- rounds, medians, ratios ------------------------------------------------------------
def median_run(runs: list[dict], key) -> dict:
    """The run whose key(run) is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def summarize(results: dict, rates: list[float]) -> dict:
    summary: dict = {}
    for side, modes in results.items():
        s = summary[side] = {}
        if modes.get("offline"):
            runs = modes["offline"]
            s["offline_tok_s"] = statistics.median(r["output_tokens_per_s"] for r in runs)
            s["offline_runs_tok_s"] = [r["output_tokens_per_s"] for r in runs]
        if modes.get("served"):
            runs = modes["served"]
            s["served_w48_tok_s"] = statistics.median(r["w48"]["output_tokens_per_s"] for r in runs)
            s["served_w48_runs_tok_s"] = [r["w48"]["output_tokens_per_s"] for r in runs]
            s["rates"] = {}
            for rate in rates:
                key = str(rate)
                per = [r["rates"][key] for r in runs if key in r["rates"]]
                s["rates"][key] = {k: statistics.median(p[k] for p in per if p[k] is not None)
                                   for k in per[0] if any(p[k] is not None for p in per)}
        if "offline_tok_s" in s and "served_w48_tok_s" in s:
            s["served_over_offline"] = round(s["served_w48_tok_s"] / s["offline_tok_s"], 3)
    if "pagedllm" in summary and "vllm" in summary:
        p, v = summary["pagedllm"], summary["vllm"]
        ratios = summary["ratios_pagedllm_over_vllm"] = {}
        for key in ("offline_tok_s", "served_w48_tok_s"):
            if key in p and key in v:
                ratios[key] = round(p[key] / v[key], 3)
        for rate in rates:
            key = str(rate)
            if key in p.get("rates", {}) and key in v.get("rates", {}):
                for metric in ("p99_ttft_ms", "median_ttft_ms", "median_itl_ms", "output_throughput"):
                    if metric in p["rates"][key] and metric in v["rates"][key]:
                        ratios[f"rate{key}_{metric}"] = round(p["rates"][key][metric] / v["rates"][key][metric], 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: pagedllm,vllm")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: offline,served")
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES),
                        help="Poisson request rates for the served latency runs, comma-separated (default 2,4,8; '' for none)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; each side's median is reported (default 2)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--input-len", type=parse_range, default=DEFAULT_INPUT_LEN, metavar="LO:HI")
    parser.add_argument("--output-len", type=parse_range, default=DEFAULT_OUTPUT_LEN, metavar="LO:HI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", "/tmp/vllm-venv"),
                        help="vLLM's venv from ../shared/peers/setup-vllm-cpu.sh (default $VLLM_VENV or /tmp/vllm-venv)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one run or server start may take")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)

    from pagedllm.model.arch_config import ArchConfig
    from pagedllm.model.loader import resolve_model

    model_dir = resolve_model(args.model).path
    sides = [s for s in args.sides.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    unknown = sorted(set(sides) - set(SIDES)) + sorted(set(modes) - set(MODES))
    if unknown or any(not (r > 0 and math.isfinite(r)) for r in rates):
        parser.error(f"unknown sides or modes {unknown}, or a rate that is not a positive number: {rates}")
    skipped = {}
    if "vllm" in sides and not os.path.exists(os.path.join(args.vllm_venv, "bin", "python")):
        skipped["vllm"] = f"no venv at {args.vllm_venv} (make it with ../shared/peers/setup-vllm-cpu.sh)"
        sides.remove("vllm")
    for side, why in skipped.items():
        print(f"skipping {side}: {why}", file=sys.stderr)
    spec = {"model": model_dir, "dtype": args.dtype, "n": args.num_requests, "input_len": list(args.input_len),
            "output_len": list(args.output_len), "vocab": ArchConfig.from_json(model_dir).vocab_size, "seed": args.seed}
    results: dict = {side: {m: [] for m in modes} for side in sides}
    log_dir = tempfile.mkdtemp(prefix="compare-vllm-")
    for r in range(args.repeat):
        for mode in modes:
            for side in sides:
                t0 = time.perf_counter()
                if mode == "offline":
                    run = run_offline(side, spec, args.vllm_venv, log_dir, args.timeout)
                    line = f"{run['output_tokens_per_s']} output tok/s"
                else:
                    run = run_served(side, spec, rates, args.vllm_venv, log_dir, args.timeout)
                    line = f"W48 {run['w48']['output_tokens_per_s']} output tok/s" + "".join(
                        f"; {k}/s TTFT p99 {v['p99_ttft_ms']} ms, ITL median {v['median_itl_ms']} ms" for k, v in run["rates"].items())
                results[side][mode].append(run)
                print(f"round {r + 1} {side} {mode}: {line} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    summary = summarize(results, rates)
    report = {"model": model_dir, "dtype": args.dtype, "workload": {k: spec[k] for k in ("n", "input_len", "output_len", "seed")},
              "rates": rates, "repeat": args.repeat, "skipped": skipped, "summary": summary, "runs": results,
              "cpu": _cpu_name(), "logs": log_dir}
    print(json.dumps(summary, indent=2))
    write_json(args.json, report)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
