"""Prefill attention on the CPU: the native bf16 kernel against the fp32-SDPA path it replaces.

    OMP_NUM_THREADS=2 python -m benchmarks.prefill_attention [--threads 2] [--reps 7]

The shapes of the throughput benchmark: SmolLM2-135M's attention (9 query
heads over 3 KV heads, head_dim 64), block_size 16, 48 prompts of 32..384
tokens prefilled in steps of up to 2,048 tokens as the scheduler packs them
(whole prompts in arrival order, the one that does not fit chunked across
steps). Both paths run CpuPagedAttention.prefill_batch (the kernel, or its torch fallback) on the same steps and
the same pool, alternated step by step in one process, so that other load on
the machine hits both alike; each step's time is its best of --reps.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pagedllm.kernels.cpu import attention as cpu_kernels
from pagedllm.model.attention.cpu_backend import CpuPagedAttention
from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.torch_backend import write_kv


def make_steps(lengths: list[int], budget: int) -> list[list[tuple[int, int]]]:
    """(prompt, tokens this step) per step: prompts in order, the step's last one chunked to fit."""
    steps, step, room = [], [], budget
    for i, n in enumerate(lengths):
        while n:
            take = min(n, room)
            step.append((i, take))
            n, room = n - take, room - take
            if room == 0:
                steps.append(step)
                step, room = [], budget
    if step:
        steps.append(step)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, kvh, d, bs = 9, 3, 64, 16
    assert cpu_kernels.supports_prefill(torch.bfloat16, d), "the native prefill kernel does not run here (no AVX-512 BF16?)"
    rng = random.Random(0)
    lengths = [rng.randint(32, 384) for _ in range(args.prompts)]
    num_blocks = sum(-(-n // bs) for n in lengths) + 16
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    tables = [[blocks.pop() for _ in range(-(-n // bs))] for n in lengths]
    cache = torch.zeros(2, num_blocks, bs, kvh, d, dtype=torch.bfloat16)
    attn = CpuPagedAttention(h, kvh, d, d**-0.5)
    g = torch.Generator().manual_seed(0)

    done = [0] * len(lengths)
    steps, flops = [], 0
    for chunks in make_steps(lengths, args.budget):
        qsl, lens, slots = [0], [], []
        for i, n in chunks:
            a, b = done[i], done[i] + n
            slots += [tables[i][p // bs] * bs + p % bs for p in range(a, b)]
            qsl.append(qsl[-1] + n)
            lens.append(b)
            flops += 4 * h * d * sum(p + 1 for p in range(a, b))  # Q.K and P.V over the causal triangle
            done[i] = b
        width = max(len(tables[i]) for i, _ in chunks)
        t = qsl[-1]
        # q as the model hands it over: a view into the fused QKV projection.
        qkv = torch.randn(t, h + 2 * kvh, d, generator=g).to(torch.bfloat16)
        q, k, v = qkv[:, :h], qkv[:, h : h + kvh].contiguous(), qkv[:, h + kvh :].contiguous()
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i, _ in chunks], dtype=torch.int32),
            num_decodes=0, query_start_loc_cpu=qsl, seq_lens_cpu=lens, max_seq_len=max(lens), max_query_len=max(n for _, n in chunks),
        )
        write_kv(cache, k, v, meta.slot_mapping)
        steps.append((q, k, v, meta))

    paths = {
        "fp32 SDPA (current)": lambda q, k, v, meta, out: attn.torch.prefill_batch(q, k, v, cache, meta, out),
        "native bf16 kernel": lambda q, k, v, meta, out: attn.prefill_batch(q, k, v, cache, meta, out),
    }
    best = {name: [float("inf")] * len(steps) for name in paths}
    outs = {name: [None] * len(steps) for name in paths}
    for _ in range(args.reps):
        for s, (q, k, v, meta) in enumerate(steps):
            for name, fn in paths.items():
                out = torch.empty(q.shape, dtype=q.dtype)
                t0 = time.perf_counter()
                fn(q, k, v, meta, out)
                best[name][s] = min(best[name][s], time.perf_counter() - t0)
                outs[name][s] = out
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(*outs.values()))
    print(f"{len(steps)} steps, {sum(lengths)} prompt tokens, {args.threads} threads, best of {args.reps}")
    for name in paths:
        total = sum(best[name])
        print(f"  {name:22s} {1e3 * total / len(steps):7.2f} ms/step  {flops / total / 1e9:6.1f} GFLOP/s")
    print(f"  speed-up {sum(best['fp32 SDPA (current)']) / sum(best['native bf16 kernel']):.2f}x; max |difference| {err:.4f}")


if __name__ == "__main__":
    main()
