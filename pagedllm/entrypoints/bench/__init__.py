"""`pagedllm bench throughput | serve | memory`: measure the engine offline, a server under load, and KV memory use.

Each command lives in its own module (throughput.py, serve.py, memory.py) with
add_args(parser) and run(args); the workload they share is workload.py.
"""

from __future__ import annotations

import argparse

COMMANDS = {
    "throughput": "offline throughput of pagedllm.LLM on a workload (optionally per concurrency)",
    "serve": "load a running OpenAI-compatible server: throughput, TTFT, TPOT, ITL, latency",
    "memory": "KV utilization and requests running per step, paged blocks vs contiguous reservation",
}


def add_parser(subparsers) -> None:
    """Register `bench` and its three commands on the main parser's subparsers."""
    from pagedllm.entrypoints.bench import memory, serve, throughput

    bench = subparsers.add_parser("bench", help="benchmarks: throughput, serve, memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module in (("throughput", throughput), ("serve", serve), ("memory", memory)):
        p = sub.add_parser(name, help=COMMANDS[name], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args.bench_run(args)
