"""KVCacheManager.stats(): what the served engine core pays after every step for its metrics.

    python -m benchmarks.kv_stats [--requests 48] [--block-size 16] [--calls 500] [--json FILE]

A KV cache manager with --requests requests of 32..384 prompt tokens plus
0..192 generated ones (seed 0; the served workload of compare_vllm), their
slots allocated; then stats() is called --calls times: microseconds per call,
the median of 5 passes. Plain Python, no model: run it from two source trees
in turn (PYTHONPATH) to compare them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.entrypoints.bench.report import write_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    lens = [rng.randint(32, 384) + rng.randint(0, 192) for _ in range(args.requests)]
    kv = KVCacheManager(sum(-(-n // args.block_size) for n in lens) + 1, args.block_size)
    for i, n in enumerate(lens):
        assert kv.allocate_slots(f"r{i}", 0, n)
    passes = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            kv.stats()
        passes.append((time.perf_counter() - t0) / args.calls * 1e6)
    figures = {"requests": args.requests, "tokens": sum(lens), "used_blocks": kv.stats().num_used_blocks,
               "us_per_call": round(statistics.median(passes), 1)}
    print(f"stats(): {figures['us_per_call']} us per call ({args.requests} requests, {figures['tokens']} tokens, "
          f"{figures['used_blocks']} blocks)")
    if args.json:
        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
