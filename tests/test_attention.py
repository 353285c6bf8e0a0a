"""Paged attention must equal plain attention on contiguous tensors: paging moves the cache, never the math."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.cpu_backend import CpuPagedAttention
from pagedllm.model.attention.torch_backend import TorchPagedAttention

# Every backend runs the same checks; the CPU kernels only where a compiler built them.
BACKENDS = [
    TorchPagedAttention,
    pytest.param(CpuPagedAttention, marks=pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")),
]


def reference(q, k, v, num_kv_heads):
    """Causal attention of one whole sequence ([L, h, d]) with SDPA on contiguous tensors."""
    group = q.shape[1] // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)


class PagedRun:
    """Several sequences fed through the paged backend in steps of chosen chunk sizes, blocks scattered at random."""

    def __init__(self, num_heads, num_kv_heads, head_dim, block_size, lengths, seed, backend=TorchPagedAttention):
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
        self.attn = backend(num_heads, num_kv_heads, head_dim, head_dim**-0.5)

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_prefill_then_decode(block_size, heads, backend):
    lengths = [37, 5, 64, 1, 18]
    prompt = [n - 3 if n > 3 else n for n in lengths]
    run = PagedRun(*heads, block_size, lengths, seed=block_size, backend=backend)
    run.step({i: p for i, p in enumerate(prompt)})  # whole prompts, uneven lengths, in one step
    for _ in range(3):
        live = {i: 1 for i, n in enumerate(lengths) if run.done[i] < n}
        if live:
            run.step(live)
    run.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_chunked_prefill_mixed_with_decodes(block_size, heads, backend):
    """Random chunk sizes per step: chunks that start mid-block, one-token chunks, decodes beside prefills."""
    lengths = [70, 33, 9, 100]
    run = PagedRun(*heads, block_size, lengths, seed=7 + block_size, backend=backend)
    while any(run.done[i] < n for i, n in enumerate(lengths)):
        chunks = {}
        for i, n in enumerate(lengths):
            left = n - run.done[i]
            if left and run.rng.random() < 0.8:
                chunks[i] = run.rng.randint(1, min(left, 23))
        if chunks:
            run.step(chunks)
    run.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_decode_batch_of_many_uneven_sequences(backend, head_dim):
    lengths = [random.Random(s).randint(1, 90) for s in range(24)]
    run = PagedRun(9, 3, head_dim, 16, lengths, seed=3, backend=backend)
    run.step({i: n - 1 for i, n in enumerate(lengths) if n > 1})
    run.step({i: 1 for i in range(len(lengths))})
    run.check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_over_a_shared_prefix_equals_plain_attention(block_size, dtype, atol, backend):
    """Sequences that share their leading blocks (forks, prefix hits) read them once: cascade attention."""
    from pagedllm.model.attention.metadata import common_prefix_blocks

    h, kvh, d = 9, 3, 64
    g = torch.Generator().manual_seed(block_size)
    prefix_len = 5 * block_size if block_size > 1 else 37
    suffix_lens = [1, 9, 30, 4, 17]  # each sequence's own tokens after the prefix, the newest last
    n_prefix_blocks = prefix_len // block_size
    total_blocks = n_prefix_blocks + sum(-(-s // block_size) for s in suffix_lens) + 2
    cache = torch.zeros(2, total_blocks, block_size, kvh, d, dtype=dtype)
    prefix_k, prefix_v = torch.randn(prefix_len, kvh, d, generator=g), torch.randn(prefix_len, kvh, d, generator=g)
    cache[0, :n_prefix_blocks] = prefix_k.view(n_prefix_blocks, block_size, kvh, d).to(dtype)
    cache[1, :n_prefix_blocks] = prefix_v.view(n_prefix_blocks, block_size, kvh, d).to(dtype)
    nxt = n_prefix_blocks + 2  # leave two blocks unused: tables point anywhere
    tables, refs = [], []
    for s in suffix_lens:
        own = list(range(nxt, nxt + -(-s // block_size)))
        nxt += len(own)
        k, v = torch.randn(s, kvh, d, generator=g), torch.randn(s, kvh, d, generator=g)
        for p in range(s):
            cache[0, own[p // block_size], p % block_size] = k[p].to(dtype)
            cache[1, own[p // block_size], p % block_size] = v[p].to(dtype)
        tables.append(list(range(n_prefix_blocks)) + own)
        refs.append((torch.cat([prefix_k, k]), torch.cat([prefix_v, v])))
    lens = [prefix_len + s for s in suffix_lens]
    common = common_prefix_blocks(tables, lens, block_size)
    assert common == n_prefix_blocks
    q = torch.randn(len(lens), h, d, generator=g)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64), query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        num_decodes=len(lens), query_start_loc_cpu=list(range(len(lens) + 1)), seq_lens_cpu=lens,
        max_seq_len=max(lens), max_query_len=1, num_common_prefix_blocks=common,
    )
    attn = backend(h, kvh, d, d**-0.5)
    out = attn.forward(q.to(dtype), torch.empty(0, kvh, d, dtype=dtype), torch.empty(0, kvh, d, dtype=dtype), cache, meta)
    out = out.view(len(lens), h, d).float()
    for i, (k, v) in enumerate(refs):
        kk, vv = k.to(dtype).float(), v.to(dtype).float()
        ref = F.scaled_dot_product_attention(
            q[i].to(dtype).float()[:, None], kk.repeat_interleave(h // kvh, 1).transpose(0, 1),
            vv.repeat_interleave(h // kvh, 1).transpose(0, 1),
        )[:, 0]
        torch.testing.assert_close(out[i], ref, atol=atol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_common_prefix_blocks_stops_where_tables_differ_and_before_the_last_token():
    from pagedllm.model.attention.metadata import common_prefix_blocks

    assert common_prefix_blocks([[1, 2, 3, 4], [1, 2, 9, 4]], [64, 64], 16) == 2
    assert common_prefix_blocks([[1, 2], [1, 2]], [32, 40], 16) == 1  # block 2 holds the first one's last token
    assert common_prefix_blocks([[1, 2, 3]], [48], 16) == 0  # one sequence: nothing to share
    assert common_prefix_blocks([[5, 2], [1, 2]], [32, 32], 16) == 0


@pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((8, 2), 128), ((12, 2), 64), ((4, 4), 80), ((6, 1), 128)])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_cpu_decode_kernel_pads_with_zeros_and_matches_the_reference(dtype, heads, head_dim, block_size):
    """Uneven lengths over scattered blocks; rows with seq_len 0 (padding) give zeros and leave their neighbours alone.

    Covers both the AVX-512 BF16 path (head sizes 64 and 128, query groups of 1 to 6
    heads, so passes over the values of one and of several heads) and the generic one.
    """
    from pagedllm.model.attention import cpu_kernels

    h, kvh = heads
    g = torch.Generator().manual_seed(head_dim + h)
    lens = [40, 0, 17, 1, 95, 16, 33]
    width = -(-max(lens) // block_size)
    num_blocks = len(lens) * width + 3
    cache = torch.randn(2, num_blocks, block_size, kvh, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.tensor([order[i * width : (i + 1) * width] for i in range(len(lens))], dtype=torch.int32)
    q = torch.randn(len(lens), h, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    out = cpu_kernels.paged_decode(q, cache, tables, torch.tensor(lens, dtype=torch.int32), scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    live = [i for i, n in enumerate(lens) if n]
    ref = TorchPagedAttention(h, kvh, head_dim, scale)._decode(
        q[live].float(), cache.float(), tables[live], torch.tensor([lens[i] for i in live], dtype=torch.int32), max(lens)
    )
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[live].float(), ref, **tol)


@pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")
def test_loading_the_cpu_kernels_leaves_subnormal_floats_alone():
    """Linked with -ffast-math, a library switches the process to flush-to-zero when loaded."""
    import subprocess
    import sys

    code = (
        "from pagedllm.model.attention import cpu_kernels; import torch; assert cpu_kernels.load() is not None; "
        "import struct; x = struct.unpack('f', struct.pack('f', 1e-40))[0]; "
        "assert torch.tensor(x).mul(1.0).item() != 0.0, 'flush-to-zero is on'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
