"""Paged attention must equal plain attention on contiguous tensors: paging moves the cache, never the math."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.torch_backend import TorchPagedAttention


def reference(q, k, v, num_kv_heads):
    """Causal attention of one whole sequence ([L, h, d]) with SDPA on contiguous tensors."""
    group = q.shape[1] // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)


class PagedRun:
    """Several sequences fed through the paged backend in steps of chosen chunk sizes, blocks scattered at random."""

    def __init__(self, num_heads, num_kv_heads, head_dim, block_size, lengths, seed):
        self.rng = random.Random(seed)
        self.h, self.kvh, self.d, self.bs = num_heads, num_kv_heads, head_dim, block_size
        g = torch.Generator().manual_seed(seed)
        self.q = [torch.randn(n, num_heads, head_dim, generator=g) for n in lengths]
        self.k = [torch.randn(n, num_kv_heads, head_dim, generator=g) for n in lengths]
        self.v = [torch.randn(n, num_kv_heads, head_dim, generator=g) for n in lengths]
        total_blocks = sum(-(-n // block_size) for n in lengths) + 3
        self.cache = torch.zeros(2, total_blocks, block_size, num_kv_heads, head_dim)
        free = list(range(total_blocks))
        self.rng.shuffle(free)  # block tables point anywhere in the pool
        self.tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
        self.done = [0] * len(lengths)
        self.out = [torch.zeros(n, num_heads, head_dim) for n in lengths]
        self.attn = TorchPagedAttention(num_heads, num_kv_heads, head_dim, head_dim**-0.5)

    def step(self, chunks: dict[int, int]) -> None:
        # Single-token queries go first, as the model runner orders them.
        order = sorted(chunks, key=lambda i: chunks[i] != 1)
        qs, ks, vs, slots, qsl, lens, tables = [], [], [], [], [0], [], []
        for i in order:
            a, b = self.done[i], self.done[i] + chunks[i]
            qs.append(self.q[i][a:b]); ks.append(self.k[i][a:b]); vs.append(self.v[i][a:b])
            slots += [self.tables[i][p // self.bs] * self.bs + p % self.bs for p in range(a, b)]
            qsl.append(qsl[-1] + b - a)
            lens.append(b)
            tables.append(self.tables[i])
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            num_decodes=sum(1 for i in order if chunks[i] == 1),
            query_start_loc_cpu=qsl, seq_lens_cpu=lens, max_seq_len=max(lens), max_query_len=max(chunks.values()),
        )
        o = self.attn.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), self.cache, meta).view(-1, self.h, self.d)
        for j, i in enumerate(order):
            a = self.done[i]
            self.out[i][a : a + chunks[i]] = o[qsl[j] : qsl[j + 1]]
            self.done[i] += chunks[i]

    def check(self):
        for i in range(len(self.q)):
            ref = reference(self.q[i], self.k[i], self.v[i], self.kvh)
            torch.testing.assert_close(self.out[i], ref, atol=1e-5, rtol=1e-4)


HEADS = [(4, 4, 32), (8, 2, 16), (9, 3, 64)]  # MHA, GQA, and SmolLM2's 9 query heads over 3 KV heads


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_prefill_then_decode(block_size, heads):
    lengths = [37, 5, 64, 1, 18]
    prompt = [n - 3 if n > 3 else n for n in lengths]
    run = PagedRun(*heads, block_size, lengths, seed=block_size)
    run.step({i: p for i, p in enumerate(prompt)})  # whole prompts, uneven lengths, in one step
    for _ in range(3):
        live = {i: 1 for i, n in enumerate(lengths) if run.done[i] < n}
        if live:
            run.step(live)
    run.check()


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_chunked_prefill_mixed_with_decodes(block_size, heads):
    """Random chunk sizes per step: chunks that start mid-block, one-token chunks, decodes beside prefills."""
    lengths = [70, 33, 9, 100]
    run = PagedRun(*heads, block_size, lengths, seed=7 + block_size)
    while any(run.done[i] < n for i, n in enumerate(lengths)):
        chunks = {}
        for i, n in enumerate(lengths):
            left = n - run.done[i]
            if left and run.rng.random() < 0.8:
                chunks[i] = run.rng.randint(1, min(left, 23))
        if chunks:
            run.step(chunks)
    run.check()


def test_decode_batch_of_many_uneven_sequences():
    lengths = [random.Random(s).randint(1, 90) for s in range(24)]
    run = PagedRun(9, 3, 64, 16, lengths, seed=3)
    run.step({i: n - 1 for i, n in enumerate(lengths) if n > 1})
    run.step({i: 1 for i in range(len(lengths))})
    run.check()
