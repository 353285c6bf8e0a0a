"""What one all-reduce costs between tensor-parallel ranks on this host: gloo over loopback TCP, and the shared-memory
all-reduce (worker/shm_all_reduce.py) that the CPU's ranks use instead.

    python -m benchmarks.all_reduce [--ranks 2] [--threads 1] [--shapes 1x576,48x576,2048x576] [--iters 200] [--json FILE]

Each rank is a process with --threads torch threads. A shape is [tokens, hidden]: with 576 (SmolLM2-135M's hidden
size), 1 and 48 tokens are decode steps of one and of 48 requests, 2048 a full prefill chunk. For each shape, each
way: a warm-up, the ranks meet, then --iters all-reduces back to back, each timed on rank 0 (the tensor is refilled
between them, untimed). Reported: the median, the mean and the 90th percentile, in microseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time
from datetime import timedelta

from pagedllm.entrypoints.bench.report import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from pagedllm.worker.shm_all_reduce import meet

    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", port, args.ranks, rank == 0, timeout=timedelta(seconds=60))
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, args.ranks, timedelta(seconds=60))
    shm = meet(store, rank, args.ranks, 60.0, lambda keys: store.wait(keys))
    assert shm is not None, "the ranks could not share memory"
    ways = {"gloo": lambda x: gloo.allreduce([x]).wait(), "shm": shm.all_reduce}
    dtype = getattr(torch, args.dtype)
    out = {}
    for shape in args.shapes.split(","):
        dims = tuple(int(d) for d in shape.split("x"))
        src = torch.randn(dims, generator=torch.Generator().manual_seed(rank)).to(dtype)
        x = src.clone()
        for way, reduce in ways.items():
            for _ in range(10):
                x.copy_(src)
                reduce(x)
            gloo.barrier().wait()
            times = []
            for _ in range(args.iters):
                x.copy_(src)
                t0 = time.perf_counter()
                reduce(x)
                times.append((time.perf_counter() - t0) * 1e6)
            times.sort()
            out[f"{shape} {way}"] = {"median_us": round(statistics.median(times), 1),
                                     "mean_us": round(statistics.fmean(times), 1),
                                     "p90_us": round(times[int(0.9 * (len(times) - 1))], 1)}
    if rank == 0:
        results.put(out)
    gloo.barrier().wait()  # rank 0 holds the store until every rank is done
    shm.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--shapes", default="1x576,48x576,2048x576")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, results)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    out = results.get(timeout=600)
    for p in procs:
        p.join()
    print(f"{args.ranks} ranks, {args.threads} thread(s) each, {args.dtype}; microseconds per all-reduce")
    print(f"{'shape':>10} {'way':>5} {'median':>9} {'mean':>9} {'p90':>9}")
    for key, row in out.items():
        shape, way = key.split()
        print(f"{shape:>10} {way:>5} {row['median_us']:>9} {row['mean_us']:>9} {row['p90_us']:>9}")
    write_json(args.json, {"ranks": args.ranks, "threads": args.threads, "dtype": args.dtype, "iters": args.iters,
                           "results": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
