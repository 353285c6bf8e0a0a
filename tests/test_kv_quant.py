"""A quantized KV cache (int8 on the CPU): the layout, the store, and the attention kernels against the torch reference."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.cpu import attention as cpu_kernels
from pagedllm.model.attention import kv_quant
from pagedllm.model.attention.cpu_backend import CpuPagedAttention
from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.torch_backend import TorchPagedAttention

INT8 = torch.int8
needs_kernels = pytest.mark.skipif(not CpuPagedAttention.available(), reason="CPU kernels did not build")
BACKENDS = [TorchPagedAttention, pytest.param(CpuPagedAttention, marks=needs_kernels)]


def pool(num_blocks: int, block_size: int, kvh: int, d: int) -> torch.Tensor:
    return torch.zeros(kv_quant.pool_shape(num_blocks, block_size, kvh, d, INT8), dtype=INT8)


def test_quantize_is_symmetric_per_token_and_head_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 3, 50)[:, None, None]
    q, s = kv_quant.quantize(x, INT8)
    assert q.dtype == INT8 and s.dtype == torch.float16 and s.shape == (50, 3)
    assert int(q.abs().max()) == 127  # every row uses the full range
    back = kv_quant.dequantize(q, s, torch.float32)
    step = s.float()[..., None]
    assert bool(((back - x).abs() <= step * 0.5001 + 1e-7).all())
    zero_q, zero_s = kv_quant.quantize(torch.zeros(2, 64), INT8)  # no division by zero, no NaN
    assert not zero_q.any() and bool((zero_s > 0).all())


def test_a_block_is_one_unit_values_and_scales_together():
    """Copying a block's bytes (copy-on-write, prefix sharing) copies its scales too."""
    c = pool(4, 16, 3, 64)
    k, v = torch.randn(16, 3, 64), torch.randn(16, 3, 64)
    kv_quant.store(c, k, v, torch.arange(16) + 16)  # block 1
    c[:, 3] = c[:, 1]
    table = torch.tensor([[3]], dtype=torch.int32)
    for half, x in ((0, k), (1, v)):
        got = kv_quant.gather(c, half, table, 16, 3, 64, torch.float32)[0]
        torch.testing.assert_close(got, x, atol=0.03, rtol=0)


def test_the_same_memory_holds_at_least_1_9x_the_blocks():
    for d in (64, 128):
        bf16 = torch.Size(kv_quant.pool_shape(1, 16, 4, d, torch.bfloat16)).numel() * 2
        int8 = torch.Size(kv_quant.pool_shape(1, 16, 4, d, INT8)).numel()
        assert bf16 / int8 >= 1.9


def test_fp8_is_for_cuda_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="needs CUDA"):
        kv_quant.resolve_kv_dtype("fp8", torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kv_quant.resolve_kv_dtype("int4", torch.bfloat16, torch.device("cpu"))
    assert kv_quant.resolve_kv_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert kv_quant.resolve_kv_dtype("int8", torch.float32, torch.device("cpu")) == INT8


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_native_store_quantizes_exactly_as_the_reference(dtype, head_dim):
    from pagedllm.kernels.cpu import ops as cpu_ops
    from pagedllm.model.layers import RotaryEmbedding

    h, kvh, bs, nb, t = 8, 2, 16, 8, 30
    g = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(t, (h + 2 * kvh) * head_dim, generator=g) * 3).to(dtype)
    pos = torch.randint(0, 200, (t,), generator=g)
    rot = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    rot.build(torch.device("cpu"), dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t].to(torch.int64)
    slots[4] = -1  # a padding row stores nothing
    ref_qkv = qkv.clone()
    native = pool(nb, bs, kvh, head_dim)
    cpu_ops.rope_and_store(qkv, pos, rot.cos, rot.sin, h, kvh, head_dim, slots, native)
    cpu_ops.rope_and_store(ref_qkv, pos, rot.cos, rot.sin, h, kvh, head_dim, slots, torch.zeros(2, nb, bs, kvh, head_dim, dtype=dtype))
    assert torch.equal(qkv, ref_qkv)  # the queries and keys rotate as before
    reference = pool(nb, bs, kvh, head_dim)
    k = ref_qkv[:, h * head_dim : (h + kvh) * head_dim].view(t, kvh, head_dim)
    v = ref_qkv[:, (h + kvh) * head_dim :].view(t, kvh, head_dim)
    kv_quant.store(reference, k, v, slots)
    assert torch.equal(native, reference)


def _without_nan(cache, kvh, d):
    """The pool with its unused slots' NaN scales zeroed: the torch reference reads every slot of a block (times 0)."""
    c = cache.clone()
    kv_quant.split(c, kvh, d)[1].nan_to_num_(0.0)
    return c


def _filled_pool(lens, block_size, kvh, d, seed):
    """An int8 pool holding random keys/values for sequences of the given lengths, in blocks scattered at random.

    Unused slots hold random bytes under NaN scales: reading one shows up as NaN.
    """
    g = torch.Generator().manual_seed(seed)
    nb = sum(-(-n // block_size) for n in lens) + 5
    c = torch.randint(-127, 128, kv_quant.pool_shape(nb, block_size, kvh, d, INT8), generator=g, dtype=INT8)
    kv_quant.split(c, kvh, d)[1].fill_(float("nan"))
    order = torch.randperm(nb, generator=g).tolist()
    tables = []
    for n in lens:
        table = [order.pop() for _ in range(-(-n // block_size))]
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        kv_quant.store(c, torch.randn(n, kvh, d, generator=g) * 2, torch.randn(n, kvh, d, generator=g), slots)
        tables.append(table)
    width = max(len(t) for t in tables)
    return c, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((8, 2), 128), ((6, 1), 128), ((4, 4), 64)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_native_decode_over_an_int8_pool_matches_the_reference(dtype, heads, head_dim, block_size):
    h, kvh = heads
    lens = [40, 0, 17, 1, 95, 16, 33]
    live = [i for i, n in enumerate(lens) if n]
    if not cpu_kernels.supports(dtype, INT8, head_dim):
        pytest.skip("the int8 decode kernel needs AVX-512 (int8 pools use the torch path elsewhere)")
    cache, tables = _filled_pool([n or 1 for n in lens], block_size, kvh, head_dim, seed=block_size + head_dim)
    q = torch.randn(len(lens), h, head_dim).to(dtype)
    scale = head_dim**-0.5
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = cpu_kernels.paged_decode(q, cache, tables, seq_lens, scale, kvh)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # a padding row
    assert not out.isnan().any()  # no slot past a sequence's end was read
    ref = TorchPagedAttention(h, kvh, head_dim, scale)._decode(q[live].float(), _without_nan(cache, kvh, head_dim), tables[live],
                                                               seq_lens[live], max(lens))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(out[live].float(), ref, **tol)


@needs_kernels
@pytest.mark.skipif(not cpu_kernels.supports_prefill(torch.bfloat16, 64, INT8), reason="the prefill kernel needs AVX-512")
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((8, 2), 128), ((8, 8), 64)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_native_prefill_over_an_int8_pool_matches_the_reference(heads, head_dim, block_size):
    """Whole prompts and chunks after cached keys, in one call; the reference reads the same quantized pool."""
    h, kvh = heads
    chunks = [17, 1, 130, 15, 64, 16]
    seq_lens = [17, 9, 130, 40, 150, 53]
    cache, tables = _filled_pool(seq_lens, block_size, kvh, head_dim, seed=block_size * head_dim)
    q = torch.randn(sum(chunks), h, head_dim).to(torch.bfloat16)
    qsl = [0]
    for n in chunks:
        qsl.append(qsl[-1] + n)
    out = cpu_kernels.paged_prefill(q, cache, tables, torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                                    head_dim**-0.5, num_kv_heads=kvh)
    attn = TorchPagedAttention(h, kvh, head_dim, head_dim**-0.5)
    clean = _without_nan(cache, kvh, head_dim)
    ref = torch.cat([attn._prefill(q[qsl[i] : qsl[i + 1]].float(), None, None, clean, tables[i], seq_lens[i]) for i in range(len(chunks))])
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=1e-3, rtol=2**-7)


def _reference(q, k, v, num_kv_heads):
    """Causal attention of one whole sequence on contiguous tensors."""
    group = q.shape[1] // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
def test_backend_over_an_int8_pool_is_attention_on_the_stored_keys(block_size, heads, backend):
    """Prefill chunks of random sizes beside decodes, through forward: each query sees exactly the quantized keys
    and values that were stored, wherever the blocks lie."""
    h, kvh, d = heads
    rng = random.Random(block_size)
    lengths = [70, 33, 9, 100]
    g = torch.Generator().manual_seed(block_size + d)
    qs = [torch.randn(n, h, d, generator=g) for n in lengths]
    ks = [torch.randn(n, kvh, d, generator=g) * 2 for n in lengths]
    vs = [torch.randn(n, kvh, d, generator=g) for n in lengths]
    nb = sum(-(-n // block_size) for n in lengths) + 3
    cache = pool(nb, block_size, kvh, d)
    free = list(range(nb))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    done = [0] * len(lengths)
    outs = [torch.zeros(n, h, d) for n in lengths]
    attn = backend(h, kvh, d, d**-0.5)
    while any(done[i] < n for i, n in enumerate(lengths)):
        chunks = {i: rng.randint(1, min(n - done[i], 23)) for i, n in enumerate(lengths) if done[i] < n and rng.random() < 0.8}
        if not chunks:
            continue
        order = sorted(chunks, key=lambda i: chunks[i] != 1)
        slots, qsl, lens, tabs = [], [0], [], []
        for i in order:
            a, b = done[i], done[i] + chunks[i]
            slots += [tables[i][p // block_size] * block_size + p % block_size for p in range(a, b)]
            qsl.append(qsl[-1] + b - a)
            lens.append(b)
            tabs.append(tables[i])
        width = max(len(t) for t in tabs)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tabs], dtype=torch.int32),
            num_decodes=sum(1 for i in order if chunks[i] == 1), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
            max_seq_len=max(lens), max_query_len=max(chunks.values()),
        )
        cat = lambda xs: torch.cat([x[done[i] : done[i] + chunks[i]] for x, i in zip(xs, order)])  # noqa: E731
        o = attn.forward(cat([qs[i] for i in order]), cat([ks[i] for i in order]), cat([vs[i] for i in order]), cache, meta)
        o = o.view(-1, h, d)
        for j, i in enumerate(order):
            outs[i][done[i] : done[i] + chunks[i]] = o[qsl[j] : qsl[j + 1]]
            done[i] += chunks[i]
    for i in range(len(lengths)):
        stored = [kv_quant.dequantize(*kv_quant.quantize(x[i], INT8), torch.float32) for x in (ks, vs)]
        torch.testing.assert_close(outs[i], _reference(qs[i], *stored, kvh), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 16])
def test_cascade_decode_over_an_int8_pool_equals_plain_decode(block_size):
    """Sequences sharing their leading blocks read them once (the torch backend's cascade path), on an int8 pool too."""
    h, kvh, d = 9, 3, 64
    g = torch.Generator().manual_seed(block_size)
    prefix_blocks = 4 if block_size > 1 else 37
    suffix_lens = [1, 9, 30, 4, 17]
    nb = prefix_blocks + sum(-(-s // block_size) for s in suffix_lens) + 2
    cache = pool(nb, block_size, kvh, d)
    prefix_slots = torch.arange(prefix_blocks * block_size)
    kv_quant.store(cache, torch.randn(len(prefix_slots), kvh, d, generator=g), torch.randn(len(prefix_slots), kvh, d, generator=g), prefix_slots)
    nxt, tables = prefix_blocks + 2, []
    for s in suffix_lens:
        own = list(range(nxt, nxt + -(-s // block_size)))
        nxt += len(own)
        slots = torch.tensor([own[p // block_size] * block_size + p % block_size for p in range(s)])
        kv_quant.store(cache, torch.randn(s, kvh, d, generator=g), torch.randn(s, kvh, d, generator=g), slots)
        tables.append(list(range(prefix_blocks)) + own)
    lens = [prefix_blocks * block_size + s for s in suffix_lens]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), h, d, generator=g)
    attn = TorchPagedAttention(h, kvh, d, d**-0.5)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cascade = attn._cascade_decode(q, cache, bt, seq_lens, max(lens), prefix_blocks)
    plain = attn._decode(q, cache, bt, seq_lens, max(lens))
    torch.testing.assert_close(cascade, plain, atol=2e-5, rtol=1e-4)
