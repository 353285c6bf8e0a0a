"""`pagedllm bench serve`: a load generator for a running OpenAI-compatible server.

Each request is one streaming POST /v1/completions (a token-id or text
prompt, max_tokens = its output length, ignore_eos, greedy) with
stream_options.include_usage, so output tokens are the server's count.
Arrivals follow a Poisson process at --request-rate (inf: all at once), and
--max-concurrency caps how many are in flight, as in vLLM's benchmark_serving;
figures are computed in serve_metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

from pagedllm.entrypoints.bench.report import print_table, write_json
from pagedllm.entrypoints.bench.serve_metrics import RequestRecord, summarize
from pagedllm.entrypoints.bench.workload import Workload, add_workload_args, load_workload, workload_config

WARMUP_PROMPT = list(range(100, 108))  # shorter than a block: it leaves nothing for the prefix cache to find


@dataclass
class ServeConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first name in /v1/models
    api_key: str | None = None
    request_rate: float = math.inf  # requests/s, Poisson arrivals
    max_concurrency: int | None = None  # None: no cap
    tokenizer: str | None = None  # for the vocabulary size of random prompts; None: the embedded default model
    timeout_s: float = 600.0
    seed: int = 0  # of the arrival times
    json: str | None = None
    progress: bool = True


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    g.add_argument("--model", default=None, help="model name to send (default: the first one /v1/models lists)")
    g.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"), help="bearer key (default: $PAGEDLLM_API_KEY)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer whose vocabulary random prompts are drawn from (default: the embedded default model)")
    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    g.add_argument("--max-concurrency", type=_positive_int, default=None, help="at most this many requests in flight")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds to wait on the server at any point of a request (default 600)")
    add_workload_args(parser)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = ServeConfig(args.base_url.rstrip("/"), args.model, args.api_key, args.request_rate, args.max_concurrency,
                      args.tokenizer, args.timeout, args.seed, args.json)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    wcfg = workload_config(args)
    workload = load_workload(wcfg, None if wcfg.dataset else _vocab_size(cfg.tokenizer))
    figures = asyncio.run(benchmark(cfg, workload))
    _print(figures)
    write_json(cfg.json, figures)
    return 0


async def benchmark(cfg: ServeConfig, workload: Workload) -> dict:
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        model = cfg.model or await _first_model(client)
        warm = await send(client, model, {"prompt_token_ids": WARMUP_PROMPT}, 4)
        if not warm.success:
            raise ValueError(f"the warm-up request to {cfg.base_url} failed: {warm.error}")
        rng = random.Random(cfg.seed)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(workload), desc="requests", unit="req", disable=not cfg.progress, dynamic_ncols=True)

        async def one(prompt: dict, output_len: int) -> RequestRecord:
            if gate is None:
                record = await send(client, model, prompt, output_len)
            else:
                async with gate:
                    record = await send(client, model, prompt, output_len)
            bar.update(1)
            return record

        t0 = time.perf_counter()
        tasks = []
        for prompt, output_len in zip(workload.prompts, workload.output_lens):
            tasks.append(asyncio.create_task(one(prompt, output_len)))
            if cfg.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    figures = {"base_url": cfg.base_url, "model": model, "num_requests": len(workload),
               "request_rate": "inf" if cfg.request_rate == math.inf else cfg.request_rate,
               "max_concurrency": cfg.max_concurrency}
    figures.update(summarize(records, duration))
    return figures


async def send(client, model: str, prompt: dict, output_len: int) -> RequestRecord:
    """One streamed completion, timed chunk by chunk; never raises: a failure is a record with an error."""
    import httpx

    body = {
        "model": model, "prompt": prompt.get("prompt_token_ids", prompt.get("prompt")), "max_tokens": output_len,
        "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    record = RequestRecord()
    start = time.perf_counter()
    last = None
    usage = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                record.error = f"HTTP {resp.status_code}: {_message(await resp.aread())}"
                return record
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"error in stream: {_message(data)}"
                    return record
                if chunk.get("choices"):
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    if not done or usage is None or last is None:
        record.error = "the stream ended without " + ("[DONE]" if not done else "usage" if usage is None else "any token")
        return record
    record.latency = last - start
    record.prompt_tokens = usage.get("prompt_tokens", 0)
    record.output_tokens = usage.get("completion_tokens", 0)
    record.success = True
    return record


async def _first_model(client) -> str:
    import httpx

    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the server at {client.base_url}: {exc}; is it running? (--base-url)") from None
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models answered HTTP {resp.status_code}: {_message(resp.content)}")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError("the server lists no models: give --model")
    return data[0]["id"]


def _vocab_size(tokenizer: str | None) -> int:
    from pagedllm.tokenizer import load_tokenizer

    if tokenizer is None:
        from pagedllm.model.loader import default_model_gguf_path

        tokenizer = default_model_gguf_path()
    return len(load_tokenizer(tokenizer))


def _message(raw: bytes | str) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second (a number, or inf), got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the request rate must be > 0 (or inf), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _print(f: dict) -> None:
    rows: list = [
        ("Model", f["model"]),
        ("Request rate (req/s)", f["request_rate"]),
        ("Max concurrency", f["max_concurrency"] or "none"),
        ("Completed requests", f["completed"]),
        ("Failed requests", f["failed"]),
        ("Duration (s)", f["duration_s"]),
        ("Total input tokens", f["total_input_tokens"]),
        ("Total output tokens", f["total_output_tokens"]),
        ("Request throughput (req/s)", f["request_throughput"]),
        ("Output token throughput (tok/s)", f["output_throughput"]),
        ("Total token throughput (tok/s)", f["total_token_throughput"]),
    ]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((title, None))
        for stat in ("mean", "median", "p99"):
            value = f[f"{stat}_{key}_ms"]
            rows.append((f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms)", "n/a" if value is None else value))
    print_table("Serving Benchmark", rows)
    for err in f["errors"]:
        print(f"failed: {err}")
