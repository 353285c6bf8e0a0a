"""Decode attention alone on the CPU, a bf16 pool against an int8 pool, side by side.

    python -m benchmarks.decode_attention --repeat 7 --json decode_attention.json
    python -m benchmarks.decode_attention --pools bfloat16,float32   # a CPU without AVX-512 (no int8 kernel)

One decode step's attention at SmolLM2-135M's shape (9 query heads over 3 KV
heads of 64) for --seqs sequences of --context tokens, in blocks of 16 spread
at random over a pool, through the native kernel (kernels/cpu/attention.py),
over --layers pools in turn as a model's layers would be, so the keys and values
come from memory and not from the caches. The two pools alternate in each
round; medians over --repeat rounds, in ms per layer, with the bytes of keys
and values each layer reads. --pools picks the pools (bfloat16, float32, int8);
--window and --soft-cap make it a sliding-window or soft-capped layer (a window
reads only its last --window tokens of each sequence).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from pagedllm.entrypoints.bench.report import write_json


def main(argv: list[str] | None = None) -> int:
    import torch

    from pagedllm.kernels.cpu import attention as cpu_kernels
    from pagedllm.model.attention import kv_quant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=48)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--pools", default="bfloat16,int8", help="comma-separated: bfloat16, float32, int8")
    parser.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    parser.add_argument("--soft-cap", type=float, default=None, help="attention-logit soft cap (default: none)")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    h, kvh, d, bs = 9, 3, 64, 16
    names = args.pools.split(",")
    kinds = {"bfloat16": (torch.bfloat16, torch.bfloat16), "float32": (torch.float32, torch.float32),
             "int8": (torch.bfloat16, torch.int8)}
    if any(n not in kinds for n in names):
        parser.error(f"--pools takes {', '.join(kinds)}, got {args.pools!r}")
    missing = [n for n in names if not cpu_kernels.supports(kinds[n][0], kinds[n][1], d)]
    if missing:
        print(f"the native decode kernel for {', '.join(missing)} did not build here", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    per_seq = -(-args.context // bs)
    num_blocks = args.seqs * per_seq + 8
    tables = torch.randperm(num_blocks, generator=g)[: args.seqs * per_seq].view(args.seqs, per_seq).to(torch.int32)
    lens = torch.full((args.seqs,), args.context, dtype=torch.int32)
    pools = {}
    for name in names:
        if name == "int8":
            pools[name] = [torch.randint(-127, 128, kv_quant.pool_shape(num_blocks, bs, kvh, d, torch.int8), generator=g,
                                         dtype=torch.int8) for _ in range(args.layers)]
            for p in pools[name]:
                kv_quant.split(p, kvh, d)[1].fill_(0.02)
        else:
            pools[name] = [torch.randn(2, num_blocks, bs, kvh, d, generator=g).to(kinds[name][1]) for _ in range(args.layers)]
    q = torch.randn(args.seqs, h, d, generator=g)
    queries = {name: q.to(kinds[name][0]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in pools}
    for _ in range(args.repeat):
        for name, layers in pools.items():
            t0 = time.perf_counter()
            for cache in layers:
                cpu_kernels.paged_decode(queries[name], cache, tables, lens, d**-0.5, kvh, window=args.window, soft_cap=args.soft_cap)
            times[name].append((time.perf_counter() - t0) / args.layers * 1e3)
    tokens = args.seqs * min(args.context, args.window or args.context) * kvh
    read = {"bfloat16": tokens * d * 2 * 2, "float32": tokens * d * 4 * 2, "int8": tokens * (d + 2) * 2}
    figures = {"seqs": args.seqs, "context": args.context, "layers": args.layers, "repeat": args.repeat,
               "window": args.window, "soft_cap": args.soft_cap}
    for name, ts in times.items():
        ms = statistics.median(ts)
        figures[name] = {"ms_per_layer": round(ms, 4), "runs_ms": [round(t, 4) for t in ts],
                         "bytes_per_layer": read[name], "gb_per_s": round(read[name] / ms / 1e6, 2)}
    if "bfloat16" in figures and "int8" in figures:
        figures["int8_speedup"] = round(figures["bfloat16"]["ms_per_layer"] / figures["int8"]["ms_per_layer"], 3)
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
