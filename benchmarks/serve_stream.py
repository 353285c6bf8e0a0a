"""What concurrent streaming clients see from a running server: output tokens/s, time to first token.

    pagedllm serve &                       # the default model, bf16 where the CPU has it
    python benchmarks/serve_stream.py --clients 64 --max-tokens 64

Each client sends one streaming /v1/completions request with a fixed prompt,
greedy, ignore_eos (so every client gets exactly --max-tokens tokens, whatever
the model says), all at once, through the official openai client. Output
tokens/s is every client's tokens over the wall time from the first request
sent to the last stream closed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from report import emit  # benchmarks/ is on sys.path when a script runs

TOPICS = [
    "a lighthouse keeper", "paged memory", "a lost umbrella", "the first snow", "a robot gardener", "an old map",
    "a quiet library", "the speed of light", "a market at dawn", "a forgotten song", "a mountain pass", "a paper boat",
    "a clockmaker", "the deep sea", "a city at night", "a tired dragon",
]


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}:"


async def one(client, model: str, i: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, arrivals, tokens = None, [], 0
    stream = await client.completions.create(
        model=model, prompt=prompt(i), max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            arrivals.append(now)
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"tokens": tokens, "ttft": (first or end) - t0, "latency": end - t0, "gaps": gaps}


async def run(args) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600) as client:
        model = args.model or (await client.models.list()).data[0].id
        await one(client, model, 0, 4)  # warm-up: first-call costs are not what a client sees later
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, model, i, args.max_tokens) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "model": model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "per_client_tokens_per_s": round(statistics.mean(r["tokens"] / r["latency"] for r in results), 2),
        "ttft_s": {"mean": round(statistics.mean(ttfts), 3), "p50": round(ttfts[len(ttfts) // 2], 3),
                   "max": round(ttfts[-1], 3)},
        "inter_chunk_s_mean": round(statistics.mean(gaps), 4) if gaps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="default: the first model the server lists")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    emit(result, args.json)


if __name__ == "__main__":
    main()
