"""Decode-sized projections on the CPU: csrc/skinny_gemm.cpp against oneDNN on a packed weight.

    python -m benchmarks.skinny_gemm [--rows 1,8,48,64] [--dtype bfloat16] [--kernel pairs]

The projections of SmolLM2-135M (fused qkv 576->960, o 576->576, fused
gate/up 576->3072, down 1536->576, the tied LM head 576->49152) at decode
batch sizes. Each weight is copied until the copies fill --memory-mb (400),
and the calls cycle through them, so that weights come from memory as in a real
step (the model's 30 layers do not fit in cache), not from L2. Both kernels
run on the same copies, alternated, each taking its best of --reps passes.

--kernel widen (the default on CPUs without AVX-512 BF16) with --dtype
bfloat16 compares the float32 kernel on the bf16 weight with oneDNN on the same
weight widened to float32 (what packed_linear.py does on such a CPU); float32
compares both on the float32 weight. --kernel pairs (the default with AVX-512
BF16) compares the bf16 pair kernel with oneDNN's bf16 on the packed bf16
weight, what packed_linear.py chooses between there.
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm.kernels.cpu import skinny_gemm
from pagedllm.kernels.cpu.packed_linear import _linear, _pack

SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]


def best_of(fn, calls: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return min(times)


def main(argv: list[str] | None = None) -> list[tuple[int, str, float, float]]:
    """Prints the table; returns (rows, shape, oneDNN s, skinny s) per cell."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32,48,64")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--kernel", default="pairs" if skinny_gemm.pairs_native() else "widen", choices=["widen", "pairs"],
                    help="pairs: bf16 dot products against oneDNN's bf16 (bf16 only); widen: float32 against oneDNN's float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory-mb", type=int, default=400, help="weights cycled through per shape (float32 bytes)")
    args = ap.parse_args(argv)
    if not skinny_gemm.available():
        raise SystemExit("the skinny kernel did not build here (it needs AVX-512 and g++)")
    dtype = getattr(torch, args.dtype)
    pairs = args.kernel == "pairs"
    if pairs and dtype != torch.bfloat16:
        raise SystemExit("--kernel pairs multiplies bf16 weights: use --dtype bfloat16")
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"{args.kernel} kernel, {args.dtype} weights, oneDNN in {'bf16' if pairs else 'float32'}")
    print(f"{'rows':>4} " + " ".join(f"{name:>22}" for name, _, _ in SHAPES) + "   (oneDNN ms / skinny ms = speed-up)")
    for rows in (int(r) for r in args.rows.split(",")):
        cells = []
        for shape, k, n in SHAPES:
            copies = max(1, min(30, args.memory_mb * 1_000_000 // (n * k * 4)))
            weights = [torch.randn(n, k, generator=g).mul_(0.05).to(dtype) for _ in range(copies)]
            onednn = [_pack(w if pairs else w.float()) for w in weights]
            skinny = [skinny_gemm.pack_pairs(w) if pairs else skinny_gemm.pack(w) for w in weights]
            x = torch.randn(rows, k, generator=g).to(dtype)
            state = {"i": 0}

            def run(packs, call):
                def step():
                    state["i"] = (state["i"] + 1) % copies
                    call(packs[state["i"]])
                return step

            if pairs:
                t_dnn = best_of(run(onednn, lambda p: _linear(x, p, None)), 3 * copies, args.reps)
                t_sk = best_of(run(skinny, lambda p: skinny_gemm.linear_pairs(x, p, n, k)), 3 * copies, args.reps)
            else:
                t_dnn = best_of(run(onednn, lambda p: _linear(x.float(), p, None).to(dtype)), 3 * copies, args.reps)
                t_sk = best_of(run(skinny, lambda p: skinny_gemm.linear(x, p, n, None, dtype)), 3 * copies, args.reps)
            cells.append(f"{1e3 * t_dnn:6.3f}/{1e3 * t_sk:6.3f}={t_dnn / t_sk:4.2f}x")
            results.append((rows, shape, t_dnn, t_sk))
        print(f"{rows:4d} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    return results


if __name__ == "__main__":
    main()
