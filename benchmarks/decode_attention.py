"""Decode attention alone on the CPU, a bf16 pool against an int8 pool, side by side.

    python benchmarks/decode_attention.py --repeat 7 --json decode_attention.json

One decode step's attention at SmolLM2-135M's shape (9 query heads over 3 KV
heads of 64) for --seqs sequences of --context tokens, in blocks of 16 spread
at random over a pool, through the native kernel (model/attention/cpu_kernels.py),
over --layers pools in turn as a model's layers would be, so the keys and values
come from memory and not from the caches. The two pools alternate in each
round; medians over --repeat rounds, in ms per layer, with the bytes of keys
and values each layer reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedllm.entrypoints.bench.report import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from pagedllm.model.attention import cpu_kernels, kv_quant

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=48)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    h, kvh, d, bs = 9, 3, 64, 16
    if not (cpu_kernels.supports(torch.bfloat16) and cpu_kernels.supports(torch.bfloat16, torch.int8, d)):
        print("the native decode kernels did not build here", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    per_seq = -(-args.context // bs)
    num_blocks = args.seqs * per_seq + 8
    tables = torch.randperm(num_blocks, generator=g)[: args.seqs * per_seq].view(args.seqs, per_seq).to(torch.int32)
    lens = torch.full((args.seqs,), args.context, dtype=torch.int32)
    pools = {
        "bfloat16": [torch.randn(2, num_blocks, bs, kvh, d, generator=g).to(torch.bfloat16) for _ in range(args.layers)],
        "int8": [torch.randint(-127, 128, kv_quant.pool_shape(num_blocks, bs, kvh, d, torch.int8), generator=g, dtype=torch.int8)
                 for _ in range(args.layers)],
    }
    for p in pools["int8"]:
        kv_quant.split(p, kvh, d)[1].fill_(0.02)
    q = torch.randn(args.seqs, h, d, generator=g).to(torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in pools}
    for _ in range(args.repeat):
        for name, layers in pools.items():
            t0 = time.perf_counter()
            for cache in layers:
                cpu_kernels.paged_decode(q, cache, tables, lens, d**-0.5, kvh)
            times[name].append((time.perf_counter() - t0) / args.layers * 1e3)
    read = {"bfloat16": args.seqs * args.context * kvh * d * 2 * 2,
            "int8": args.seqs * args.context * kvh * (d + 2) * 2}
    figures = {"seqs": args.seqs, "context": args.context, "layers": args.layers, "repeat": args.repeat}
    for name, ts in times.items():
        ms = statistics.median(ts)
        figures[name] = {"ms_per_layer": round(ms, 4), "runs_ms": [round(t, 4) for t in ts],
                         "bytes_per_layer": read[name], "gb_per_s": round(read[name] / ms / 1e6, 2)}
    figures["int8_speedup"] = round(figures["bfloat16"]["ms_per_layer"] / figures["int8"]["ms_per_layer"], 3)
    print(json.dumps(figures, indent=2))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
