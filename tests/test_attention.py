"""Paged attention must equal plain attention on contiguous tensors: paging moves the cache, never the math."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.cpu import attention as cpu_kernels
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

    Covers both the AVX-512 path (head sizes 64 and 128, query groups of 1 to 6
    heads, so passes over the values of one and of several heads) and the generic one.
    """
    from pagedllm.kernels.cpu import attention as cpu_kernels

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
    # The queries as the model hands them over: a slice of each row of the fused qkv projection, read in place.
    qkv = torch.cat([q.reshape(len(lens), -1), torch.randn(len(lens), 2 * kvh * head_dim, generator=g).to(dtype)], 1)
    strided = qkv[:, : h * head_dim].view(len(lens), h, head_dim)
    assert strided.stride(0) != h * head_dim
    assert torch.equal(cpu_kernels.paged_decode(strided, cache, tables, torch.tensor(lens, dtype=torch.int32), scale), out)


@pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")
def test_loading_the_cpu_kernels_leaves_subnormal_floats_alone():
    """Linked with -ffast-math, a library switches the process to flush-to-zero when loaded."""
    import subprocess
    import sys

    code = (
        "from pagedllm.kernels.cpu import attention as cpu_kernels; import torch; assert cpu_kernels.load() is not None; "
        "import struct; x = struct.unpack('f', struct.pack('f', 1e-40))[0]; "
        "assert torch.tensor(x).mul(1.0).item() != 0.0, 'flush-to-zero is on'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _bf16_prefill_case(h, kvh, d, block_size, chunks, seq_lens, seed):
    """Sequences whose first seq_len tokens' keys/values sit in a NaN-filled bf16 pool, in blocks scattered at random.

    Returns q [sum(chunks), h, d] (the last chunk of each sequence), the pool,
    block tables padded with 0, and query_start_loc.
    """
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 7
    cache = torch.full((2, num_blocks, block_size, kvh, d), float("nan"), dtype=torch.bfloat16)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // block_size) for n in seq_lens)
    tables = []
    for n in seq_lens:
        table = [order.pop() for _ in range(-(-n // block_size))]
        kv = torch.randn(2, len(table) * block_size, kvh, d, generator=g).to(torch.bfloat16)
        cache[:, table] = kv.view(2, len(table), block_size, kvh, d)
        last = table[-1]
        cache[:, last, n - (len(table) - 1) * block_size :] = float("nan")  # the last block's unused slots stay NaN
        tables.append(table + [0] * (width - len(table)))
    q = torch.randn(sum(chunks), h, d, generator=g).to(torch.bfloat16)
    qsl = [0]
    for n in chunks:
        qsl.append(qsl[-1] + n)
    return q, cache, torch.tensor(tables, dtype=torch.int32), qsl


def _fp32_prefill_reference(q, cache, tables, qsl, seq_lens, num_kv_heads):
    """What the CPU backend computed before the kernel: the torch backend's _prefill on float32 copies."""
    h, d = q.shape[1:]
    bs = cache.shape[2]
    attn = TorchPagedAttention(h, num_kv_heads, d, d**-0.5)
    cf = cache.float()
    outs = []
    for i, seq_len in enumerate(seq_lens):
        n = qsl[i + 1] - qsl[i]
        pos = torch.arange(seq_len - n, seq_len)
        slots = tables[i][pos // bs].long() * bs + pos % bs
        k_new, v_new = (cf[j].view(-1, num_kv_heads, d)[slots] for j in (0, 1))
        outs.append(attn._prefill(q[qsl[i] : qsl[i + 1]].float(), k_new, v_new, cf, tables[i], seq_len))
    return torch.cat(outs)


def _assert_close_to_bf16_rounding(out, ref):
    """Within one bf16 ulp of the float32 reference (its own rounding may differ where ref sits near a tie)."""
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=1e-3, rtol=2**-7)


needs_prefill_kernel = pytest.mark.skipif(
    not cpu_kernels.supports_prefill(torch.bfloat16, 64), reason="the native prefill kernel needs AVX-512 and a C++ compiler"
)


@needs_prefill_kernel
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((8, 8), 64), ((32, 8), 128), ((8, 2), 128), ((12, 4), 64)])
def test_cpu_prefill_kernel_matches_the_fp32_reference(heads, head_dim, block_size):
    """Whole prompts and chunks after cached keys (chunked prefill, prefix hits), uneven lengths, all in one call.

    Chunks of 1, 15, 16, 17, 100 and 384 tokens straddle the kernel's query and
    key tiles and the blocks; every slot the sequences do not own is NaN.
    """
    h, kvh = heads
    chunks = [17, 1, 384, 15, 100, 16, 16, 1]
    seq_lens = [17, 9, 384, 40, 250, 16, 53, 1]  # some whole prompts, some chunks after earlier keys
    q, cache, tables, qsl = _bf16_prefill_case(h, kvh, head_dim, block_size, chunks, seq_lens, seed=block_size + head_dim + h)
    out = cpu_kernels.paged_prefill(q, cache, tables, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), head_dim**-0.5)
    ref = _fp32_prefill_reference(q, cache, tables, qsl, seq_lens, kvh)
    _assert_close_to_bf16_rounding(out, ref)
    assert (out.float() - ref).abs().max() < 2e-2


@needs_prefill_kernel
def test_cpu_prefill_kernel_reads_a_strided_q_and_a_wide_block_table():
    """q as the model hands it over (a view into the fused QKV projection); block tables wider than needed."""
    h, kvh, d = 9, 3, 64
    chunks, seq_lens = [33, 70], [33, 91]
    q, cache, tables, qsl = _bf16_prefill_case(h, kvh, d, 16, chunks, seq_lens, seed=5)
    qkv = torch.zeros(q.shape[0], h + 2 * kvh, d, dtype=torch.bfloat16)
    qkv[:, :h] = q
    wide = torch.cat([tables, torch.zeros(2, 5, dtype=torch.int32)], dim=1)
    out = cpu_kernels.paged_prefill(qkv[:, :h], cache, wide, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), d**-0.5)
    _assert_close_to_bf16_rounding(out, _fp32_prefill_reference(q, cache, tables, qsl, seq_lens, kvh))


def test_cpu_prefill_kernel_reports_what_it_does_not_support():
    assert not cpu_kernels.supports_prefill(torch.float32, 64)
    assert not cpu_kernels.supports_prefill(torch.bfloat16, 80)


@pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_cpu_backend_bf16_step_of_decodes_and_prefill_chunks(head_dim, monkeypatch):
    """One bf16 step through forward: decodes first, then prefill chunks; the kernel where it runs, the fp32 path where not."""
    h, kvh, bs = 8, 2, 16
    chunks = [1, 1, 1, 40, 7, 130]
    seq_lens = [20, 57, 1, 40, 30, 200]
    q, cache, tables, qsl = _bf16_prefill_case(h, kvh, head_dim, bs, chunks, seq_lens, seed=head_dim)
    # This step's own keys/values go through forward's write_kv: take them out of the pool, and NaN their slots.
    slots = []
    for i, (n, seq_len) in enumerate(zip(chunks, seq_lens)):
        pos = torch.arange(seq_len - n, seq_len)
        slots.append(tables[i][pos // bs].long() * bs + pos % bs)
    slots = torch.cat(slots)
    k, v = (cache[j].view(-1, kvh, head_dim)[slots].clone() for j in (0, 1))
    ref_cache = cache.nan_to_num(0.0)  # the torch decode path multiplies masked slots by 0: NaN there would show
    for j in (0, 1):
        cache[j].view(-1, kvh, head_dim)[slots] = float("nan")
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables, num_decodes=3, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, max_seq_len=max(seq_lens),
        max_query_len=max(chunks),
    )
    if cpu_kernels.supports_prefill(torch.bfloat16, head_dim):
        fail_in_torch_fallback(monkeypatch, "_prefill", "the prefill kernel should have run")
    out = CpuPagedAttention(h, kvh, head_dim, head_dim**-0.5).forward(q, k, v, cache, meta).view(-1, h, head_dim)
    ref = TorchPagedAttention(h, kvh, head_dim, head_dim**-0.5).forward(q.float(), k.float(), v.float(), ref_cache.float(), meta)
    _assert_close_to_bf16_rounding(out, ref.view(-1, h, head_dim))


# Sliding windows and soft-capping. Sequences as (tokens already cached, new tokens): decodes first, then
# whole prompts and chunks after cached keys (starting mid-block), over contexts much longer than the windows.
WINDOW_SEQS = [(99, 1), (40, 1), (3, 1), (130, 1), (0, 70), (55, 20), (160, 33), (16, 16)]
WINDOWS = [1, 5, 16, 37, None]
POOLS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16), "int8": (torch.bfloat16, torch.int8)}


def _poison(pool, block, offsets, value, kvh, d):
    """Fill slots `offsets` of `block` (both halves) with `value`: an int8 pool gets values 127 and scales `value`."""
    from pagedllm.model.attention import kv_quant

    if kv_quant.is_quantized(pool.dtype):
        values, scales = kv_quant.split(pool, kvh, d)
        values[:, block, offsets] = 127
        scales[:, block, offsets] = value
    else:
        pool[:, block, offsets] = value


def fail_in_torch_fallback(monkeypatch, method: str, message: str) -> None:
    """The torch backend that CpuPagedAttention holds for what its kernels do not take fails in `method`."""
    failing = type("Failing", (CpuPagedAttention.fallback,), {method: lambda *a: pytest.fail(message)})
    monkeypatch.setattr(CpuPagedAttention, "fallback", failing)


def run_windowed_step(heads, block_size, window, soft_cap, q_dtype, kv_dtype, seed=0, seqs=WINDOW_SEQS):
    """One step of WINDOW_SEQS through CpuPagedAttention over a pool and block tables in which every position before
    each sequence's first query's window is poisoned: the table entries of the blocks wholly before it point at a
    block filled with NaN (at a finite block where the torch path, which multiplies what it masks by 0, runs), the
    slots before it in its first block are NaN too. Compared with the torch backend on the clean pool and tables.
    """
    from pagedllm.model.attention import kv_quant
    from pagedllm.model.attention.torch_backend import write_kv

    h, kvh, d = heads
    bs = block_size
    g = torch.Generator().manual_seed(seed)
    seqs = sorted(seqs, key=lambda s: s[1] != 1)
    lens = [c + n for c, n in seqs]
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + 4
    ids = torch.randperm(total, generator=g).tolist()  # tables point anywhere in the pool
    poison_blocks = {"nan": ids.pop(), "finite": ids.pop()}
    tables = [[ids.pop() for _ in range(n)] for n in nblocks]
    pool = torch.zeros(kv_quant.pool_shape(total, bs, kvh, d, kv_dtype), dtype=kv_dtype)
    slots = [[t[p // bs] * bs + p % bs for p in range(c + n)] for t, (c, n) in zip(tables, seqs)]
    cached = torch.tensor([s for ss, (c, _) in zip(slots, seqs) for s in ss[:c]], dtype=torch.int64)
    store_dtype = torch.float32 if kv_quant.is_quantized(kv_dtype) else kv_dtype
    write_kv(pool, *(torch.randn(len(cached), kvh, d, generator=g).to(store_dtype) for _ in range(2)), cached)
    new_slots = [s for ss, (c, _) in zip(slots, seqs) for s in ss[c:]]
    num_tokens = len(new_slots)
    q, k, v = (torch.randn(num_tokens, n, d, generator=g).to(q_dtype) for n in (h, kvh, kvh))
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)

    def meta(block_tables):
        width = max(len(t) for t in block_tables)
        return AttentionMetadata(
            slot_mapping=torch.tensor(new_slots, dtype=torch.int64), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
            num_decodes=sum(n == 1 for _, n in seqs), query_start_loc_cpu=qsl, seq_lens_cpu=lens, max_seq_len=max(lens),
            max_query_len=max(n for _, n in seqs),
        )

    ref_pool = pool.clone() if kv_quant.is_quantized(kv_dtype) else pool.float()
    scale = d**-0.5
    ref = TorchPagedAttention(h, kvh, d, scale, window, soft_cap).forward(q.float(), k.float(), v.float(), ref_pool, meta(tables))

    # Where the native kernels run they must not read what lies before a window: NaN there would show.
    native_decode = cpu_kernels.supports(q_dtype, kv_dtype, d)
    native_prefill = cpu_kernels.supports_prefill(q_dtype, d, kv_dtype)
    value = {"nan": float("nan"), "finite": 100.0}
    for kind, block in poison_blocks.items():
        _poison(pool, block, slice(None), value[kind], kvh, d)
    poisoned = []
    for t, (c, n) in zip(tables, seqs):
        kind = "nan" if (native_decode if n == 1 else native_prefill) else "finite"
        first = max(0, c - window + 1) if window else 0  # the first query's window starts here
        poisoned.append([poison_blocks[kind]] * (first // bs) + t[first // bs :])
        if first % bs:
            _poison(pool, t[first // bs], slice(0, first % bs), value[kind], kvh, d)
    attn = CpuPagedAttention(h, kvh, d, scale, window, soft_cap)
    out = attn.forward(q, k, v, pool, meta(poisoned)).view(num_tokens, h, d)
    assert not out.isnan().any()
    tol = dict(atol=1e-5, rtol=1e-4) if q_dtype == torch.float32 else dict(atol=1e-3, rtol=2**-7)
    torch.testing.assert_close(out.float(), ref.view(num_tokens, h, d).to(q_dtype).float(), **tol)
    return native_decode, native_prefill


needs_cpu_kernels = pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")


WINDOW_CAPS = [(w, cap) for w in WINDOWS for cap in (None, 50.0, 2.0) if (w, cap) != (None, None)]  # plain: the tests above


@needs_cpu_kernels
@pytest.mark.parametrize("pool", POOLS.keys())
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window,soft_cap", WINDOW_CAPS, ids=[f"w{w}-cap{c}" for w, c in WINDOW_CAPS])
def test_cpu_backend_sliding_window_and_soft_cap_never_read_before_the_window(window, soft_cap, block_size, pool, monkeypatch):
    """Decodes and prefill chunks in one step, native kernels where they run here (the torch path elsewhere)."""
    q_dtype, kv_dtype = POOLS[pool]
    if cpu_kernels.supports(q_dtype, kv_dtype, 64):
        fail_in_torch_fallback(monkeypatch, "_decode", "the native decode kernel should have run")
    if cpu_kernels.supports_prefill(q_dtype, 64, kv_dtype):
        fail_in_torch_fallback(monkeypatch, "_prefill", "the native prefill kernel should have run")
    run_windowed_step((9, 3, 64), block_size, window, soft_cap, q_dtype, kv_dtype, seed=block_size + (window or 0))


@needs_cpu_kernels
@pytest.mark.parametrize("pool", POOLS.keys())
@pytest.mark.parametrize("heads", [(8, 2, 128), (4, 4, 80), (6, 1, 128)], ids=["8_over_2_d128", "mha_d80", "6_over_1_d128"])
def test_cpu_backend_sliding_window_other_head_sizes(heads, pool):
    q_dtype, kv_dtype = POOLS[pool]
    run_windowed_step(heads, 16, 37, 2.0, q_dtype, kv_dtype, seed=1)
    run_windowed_step(heads, 8, 5, None, q_dtype, kv_dtype, seed=2)
