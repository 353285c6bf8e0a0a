"""The triton backend must compute what the torch backend computes, and store the same cache.

On a GPU the kernels run compiled; elsewhere the same tests run on the CPU
under triton's interpreter (TRITON_INTERPRET=1), on small shapes. Without
triton they skip. The unused slots of the pool the kernels see are NaN, so a
read of any key a query may not see shows up as a NaN in its output.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.selector import get_attention_backend
from pagedllm.model.attention.torch_backend import TorchPagedAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_triton_backend():
    """TritonPagedAttention, or None without triton.

    On the CPU the kernels run in triton's interpreter, which triton picks
    while it imports and when each kernel is defined: TRITON_INTERPRET=1 is set
    here before the first `import triton` and stays set (nothing else in the
    suite uses triton; a half-interpreted triton fails on its own lazy imports).
    """
    if DEVICE == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton was imported before this module could set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from pagedllm.model.attention.triton_backend import TritonPagedAttention
    except ImportError:
        return None
    return TritonPagedAttention


def _interpreter_broken() -> bool:
    """Before 3.8, triton's interpreter ran a loop up to a tensor bound with int() on a 1-element array, which numpy 2.4 refuses."""
    import numpy
    import triton

    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    return DEVICE == "cpu" and version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4)


TritonPagedAttention = _import_triton_backend()
needs_triton = pytest.mark.skipif(TritonPagedAttention is None, reason="triton is not installed")
if TritonPagedAttention is not None and _interpreter_broken():
    needs_triton = pytest.mark.skip(reason="triton < 3.8's interpreter cannot run these kernels with numpy >= 2.4")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 runs on the GPU only (the interpreter has no bf16 constants)")),
]


def _meta(q_lens, seq_lens, tables, slots, num_decodes, device):
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        num_decodes=num_decodes, query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
        max_seq_len=max(seq_lens), max_query_len=max(q_lens),
    )


def run_both(seqs, heads, block_size, dtype=torch.float32, num_padded=0, seed=0):
    """Run one flat batch through both backends and compare outputs and caches.

    seqs: (tokens already cached, new tokens) per sequence; single-token ones go
    first, as the model runner orders them. num_padded rows follow, as a CUDA
    graph pads a decode batch: one query token, slot -1, seq_len 0.
    """
    h, kvh, d = heads
    g = torch.Generator().manual_seed(seed)
    seqs = sorted(seqs, key=lambda s: s[1] != 1)
    lens = [c + n for c, n in seqs]
    nblocks = [-(-n // block_size) for n in lens]
    ids = torch.randperm(sum(nblocks) + 2, generator=g).tolist()  # tables point anywhere in the pool
    tables = [[ids.pop() for _ in range(n)] for n in nblocks]
    pool = torch.full((2, sum(nblocks) + 2, block_size, kvh, d), float("nan"))
    flat = pool.view(2, -1, kvh, d)
    new_slots = []
    for t, (c, n) in zip(tables, seqs):
        slots = [t[p // block_size] * block_size + p % block_size for p in range(c + n)]
        flat[:, slots[:c]] = torch.randn(2, c, kvh, d, generator=g)
        new_slots += slots[c:]
    num_real = len(new_slots)
    total = num_real + num_padded
    q, k, v = (torch.randn(total, n, d, generator=g).to(dtype) for n in (h, kvh, kvh))
    pool = pool.to(dtype)

    ref_cache = pool.nan_to_num(0.0)  # the torch backend reads unused slots (times zero weights)
    ref_meta = _meta([n for _, n in seqs], lens, tables, new_slots, sum(n == 1 for _, n in seqs), "cpu")
    ref = TorchPagedAttention(h, kvh, d, d**-0.5).forward(q[:num_real], k[:num_real], v[:num_real], ref_cache, ref_meta)

    dev = lambda x: x.to(DEVICE)  # noqa: E731
    cache = dev(pool)
    meta = _meta(
        [n for _, n in seqs] + [1] * num_padded, lens + [0] * num_padded, tables + [[]] * num_padded,
        new_slots + [-1] * num_padded, ref_meta.num_decodes, DEVICE,
    )
    # The launch path may use no host-side metadata (a CUDA graph would freeze it) and no sync.
    meta = dataclasses.replace(meta, num_decodes=None, query_start_loc_cpu=None, seq_lens_cpu=None, max_seq_len=None, max_query_len=None)
    attn = TritonPagedAttention(h, kvh, d, d**-0.5)
    q, k, v = dev(q), dev(k), dev(v)
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn.forward(q, k, v, cache, meta)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    out = out.cpu()

    assert out.shape == (total, h * d)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:num_real].float(), ref.float(), **tol)
    assert torch.equal(out[num_real:], torch.zeros_like(out[num_real:])), "padded rows must come out as zeros"
    assert torch.equal(cache.cpu().nan_to_num(0.0), ref_cache), "the pools differ after the store"


PREFILL = [(0, 37), (0, 5), (0, 64), (0, 1)]
CHUNKED = [(20, 13), (32, 16), (5, 40), (47, 2)]  # chunks start mid-block and on a block edge
DECODE = [(c, 1) for c in (0, 15, 16, 31, 33, 70)]
MIXED = DECODE[1::2] + CHUNKED[:2] + PREFILL[:2]
CASES = {"prefill": PREFILL, "chunked_prefill": CHUNKED, "decode": DECODE, "mixed": MIXED}
HEADS = {"gqa_4_over_2": (4, 2, 64), "9_over_3": (9, 3, 64)}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", CASES.keys())
def test_matches_torch_backend(case, block_size, heads, dtype):
    run_both(CASES[case], heads, block_size, dtype, seed=block_size)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 1, 128), (6, 2, 80)], ids=["head128", "head80_padded_tile"])
def test_other_head_sizes(heads, dtype):
    run_both(MIXED, heads, 16, dtype, seed=1)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_padded_rows_are_zero_and_leave_others_alone(case, dtype):
    run_both(CASES[case], (9, 3, 64), 16, dtype, num_padded=3, seed=2)


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_decode_replays_in_a_cuda_graph():
    """Captured once on an all-padding batch, replayed with other lengths, slots and padding: as an eager launch."""
    h, kvh, d, bs, batch, width = 9, 3, 64, 16, 8, 4
    attn = TritonPagedAttention(h, kvh, d, d**-0.5)
    pool = torch.randn(2, batch * width, bs, kvh, d, device="cuda")
    q, k, v = (torch.zeros(batch, n, d, device="cuda") for n in (h, kvh, kvh))
    meta = _meta([1] * batch, [0] * batch, [[0] * width] * batch, [-1] * batch, batch, "cuda")
    cache = pool.clone()
    attn.forward(q, k, v, cache, meta)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.forward(q, k, v, cache, meta)
    ids = torch.randperm(batch * width, generator=torch.Generator().manual_seed(0)).view(batch, width).tolist()
    for lens in ([5, 17, 33, 1, 0, 0, 0, 0], [40, 2, 16, 9, 31, 64, 0, 0]):
        slots = [ids[i][(n - 1) // bs] * bs + (n - 1) % bs if n else -1 for i, n in enumerate(lens)]
        step = _meta([1] * batch, lens, ids, slots, batch, "cuda")
        for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
            getattr(meta, name).copy_(getattr(step, name))
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        cache.copy_(pool)
        graph.replay()
        eager_cache = pool.clone()
        expected = attn.forward(q, k, v, eager_cache, step)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(cache, eager_cache)
        real = sum(n > 0 for n in lens)
        assert torch.equal(out[real:], torch.zeros_like(out[real:]))


@needs_triton
def test_llama_takes_the_backend_class():
    """A tiny model built with the triton backend gives the same hidden states as with the torch one."""
    from pagedllm.model.arch_config import ArchConfig
    from pagedllm.model.models.llama import LlamaForCausalLM

    cfg = ArchConfig.from_dict(dict(
        model_type="llama", vocab_size=64, hidden_size=72, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=64,
    ))
    lens, bs = [11, 3], 16
    ids = torch.randint(0, 64, (sum(lens),), generator=torch.Generator().manual_seed(0))
    outs = []
    for backend, device in ((TorchPagedAttention, "cpu"), (TritonPagedAttention, DEVICE)):
        model = LlamaForCausalLM(cfg, backend)
        assert all(type(layer.self_attn.attn) is backend for layer in model.layers)
        model.init_dummy_weights(0)
        model = model.to(device)
        model.build_tables(torch.device(device), torch.float32)
        caches = [torch.zeros(2, 4, bs, 3, 8, device=device) for _ in range(2)]
        slots = list(range(lens[0])) + list(range(bs, bs + lens[1]))
        meta = _meta(lens, lens, [[0], [1]], slots, 0, device)
        positions = torch.tensor(list(range(lens[0])) + list(range(lens[1])), device=device)
        with torch.inference_mode():
            outs.append(model(ids.to(device), positions, caches, meta).cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)


def test_selector():
    from pagedllm.model.attention.cpu_backend import CpuPagedAttention

    assert get_attention_backend("cpu") is (CpuPagedAttention if CpuPagedAttention.available() else TorchPagedAttention)
    assert get_attention_backend("cuda", "torch") is TorchPagedAttention
    assert get_attention_backend("cuda") is (TritonPagedAttention or TorchPagedAttention)
    with pytest.raises(ValueError, match="flash"):
        get_attention_backend("cuda", "flash")
    if TritonPagedAttention is not None:
        assert get_attention_backend("cpu", "triton") is TritonPagedAttention


def test_without_triton_pagedllm_imports_and_the_selector_says_so():
    """In a fresh process where `import triton` fails: pagedllm imports, auto falls back, "triton" explains."""
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import pagedllm, pagedllm.entrypoints.llm, pagedllm.worker.model_runner
from pagedllm.model.attention.selector import get_attention_backend
from pagedllm.model.attention.torch_backend import TorchPagedAttention
assert get_attention_backend("cuda") is TorchPagedAttention
try:
    get_attention_backend("cuda", "triton")
except ValueError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("no error for a missing triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_both_quantized(seqs, heads, block_size, kv_dtype, num_padded=0, seed=0):
    """run_both over a quantized pool (int8, fp8): the same outputs as the torch backend on the same pool, and the same bytes stored."""
    from pagedllm.model.attention import kv_quant

    h, kvh, d = heads
    g = torch.Generator().manual_seed(seed)
    seqs = sorted(seqs, key=lambda s: s[1] != 1)
    lens = [c + n for c, n in seqs]
    nblocks = [-(-n // block_size) for n in lens]
    ids = torch.randperm(sum(nblocks) + 2, generator=g).tolist()
    tables = [[ids.pop() for _ in range(n)] for n in nblocks]
    shape = kv_quant.pool_shape(sum(nblocks) + 2, block_size, kvh, d, kv_dtype)
    pool = torch.zeros(shape, dtype=torch.int8).view(kv_dtype)
    new_slots = []
    for t, (c, n) in zip(tables, seqs):
        slots = [t[p // block_size] * block_size + p % block_size for p in range(c + n)]
        kv_quant.store(pool, torch.randn(c, kvh, d, generator=g) * 2, torch.randn(c, kvh, d, generator=g), torch.tensor(slots[:c], dtype=torch.int64))
        new_slots += slots[c:]
    num_real = len(new_slots)
    total = num_real + num_padded
    q, k, v = (torch.randn(total, n, d, generator=g) for n in (h, kvh, kvh))
    ref_cache = pool.clone()
    ref_meta = _meta([n for _, n in seqs], lens, tables, new_slots, sum(n == 1 for _, n in seqs), "cpu")
    ref = TorchPagedAttention(h, kvh, d, d**-0.5).forward(q[:num_real], k[:num_real], v[:num_real], ref_cache, ref_meta)
    meta = _meta(
        [n for _, n in seqs] + [1] * num_padded, lens + [0] * num_padded, tables + [[]] * num_padded,
        new_slots + [-1] * num_padded, ref_meta.num_decodes, DEVICE,
    )
    meta = dataclasses.replace(meta, num_decodes=None, query_start_loc_cpu=None, seq_lens_cpu=None, max_seq_len=None, max_query_len=None)
    cache = pool.to(DEVICE)
    out = TritonPagedAttention(h, kvh, d, d**-0.5).forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, meta).cpu()
    torch.testing.assert_close(out[:num_real], ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(out[num_real:], torch.zeros_like(out[num_real:]))
    assert torch.equal(cache.cpu().view(torch.int8), ref_cache.view(torch.int8)), "the pools differ after the store"


@needs_triton
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("block_size", [1, 32])
@pytest.mark.parametrize("case", ["prefill", "chunked_prefill", "decode", "mixed"])
def test_quantized_pool_matches_torch_backend(case, block_size, kv_dtype):
    run_both_quantized(CASES[case], HEADS["9_over_3"], block_size, kv_dtype, seed=block_size)


@needs_triton
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_pool_pads_with_zeros_and_other_head_sizes(kv_dtype):
    run_both_quantized(CASES["mixed"], (9, 3, 64), 16, kv_dtype, num_padded=3, seed=2)
    run_both_quantized(CASES["mixed"], (4, 1, 128), 16, kv_dtype, seed=3)


# Sliding windows and soft-capping: (tokens already cached, new tokens) over contexts much longer than the windows.
WINDOW_SEQS = [(99, 1), (3, 1), (130, 1), (0, 40), (55, 20), (100, 17)]
WINDOWS = [1, 5, 16, 37, None]


def run_windowed(seqs, heads, block_size, window, soft_cap, dtype=torch.float32, kv_dtype=None, num_padded=2, seed=0):
    """One flat batch through both backends, as run_both, but for a layer with a sliding window and/or a soft cap.

    The triton kernel sees block tables whose entries before each sequence's first query's window point at a
    NaN-filled block, and NaN in the slots before that window in its first block: a read of any of them would
    show as NaN. The torch backend runs on the clean tables, NaN-free. kv_dtype: a quantized pool (int8, fp8).
    """
    from pagedllm.model.attention import kv_quant

    h, kvh, d = heads
    bs = block_size
    g = torch.Generator().manual_seed(seed)
    seqs = sorted(seqs, key=lambda s: s[1] != 1)
    lens = [c + n for c, n in seqs]
    nblocks = [-(-n // bs) for n in lens]
    ids = torch.randperm(sum(nblocks) + 2, generator=g).tolist()
    nan_block = ids.pop()
    tables = [[ids.pop() for _ in range(n)] for n in nblocks]
    num_blocks = sum(nblocks) + 2
    quant = kv_dtype is not None
    if quant:
        pool = torch.zeros(kv_quant.pool_shape(num_blocks, bs, kvh, d, kv_dtype), dtype=torch.int8).view(kv_dtype)
    else:
        pool = torch.zeros(2, num_blocks, bs, kvh, d, dtype=dtype)
    new_slots = []
    for t, (c, n) in zip(tables, seqs):
        slots = [t[p // bs] * bs + p % bs for p in range(c + n)]
        cached = torch.tensor(slots[:c], dtype=torch.int64)
        k_c, v_c = torch.randn(c, kvh, d, generator=g), torch.randn(c, kvh, d, generator=g)
        if quant:
            kv_quant.store(pool, k_c, v_c, cached)
        else:
            for i, x in ((0, k_c), (1, v_c)):
                pool[i].view(-1, kvh, d)[cached] = x.to(dtype)
        new_slots += slots[c:]
    num_real = len(new_slots)
    total = num_real + num_padded
    q, k, v = (torch.randn(total, n, d, generator=g).to(dtype) for n in (h, kvh, kvh))
    scale = d**-0.5

    ref_cache = pool.clone()
    ref_meta = _meta([n for _, n in seqs], lens, tables, new_slots, sum(n == 1 for _, n in seqs), "cpu")
    ref = TorchPagedAttention(h, kvh, d, scale, window, soft_cap).forward(q[:num_real], k[:num_real], v[:num_real], ref_cache, ref_meta)

    def poison(block, offsets):
        if quant:
            values, scales = kv_quant.split(pool.view(torch.int8), kvh, d)
            values[:, block, offsets] = 127
            scales[:, block, offsets] = float("nan")
        else:
            pool[:, block, offsets] = float("nan")

    poison(nan_block, slice(None))
    poisoned = []
    for t, (c, n) in zip(tables, seqs):
        first = max(0, c - window + 1) if window else 0  # the first query's window starts here
        poisoned.append([nan_block] * (first // bs) + t[first // bs :])
        if first % bs:
            poison(t[first // bs], slice(0, first % bs))
    meta = _meta(
        [n for _, n in seqs] + [1] * num_padded, lens + [0] * num_padded, poisoned + [[]] * num_padded,
        new_slots + [-1] * num_padded, ref_meta.num_decodes, DEVICE,
    )
    meta = dataclasses.replace(meta, num_decodes=None, query_start_loc_cpu=None, seq_lens_cpu=None, max_seq_len=None, max_query_len=None)
    attn = TritonPagedAttention(h, kvh, d, scale, window, soft_cap)
    out = attn.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), pool.to(DEVICE), meta).cpu()
    assert not out.isnan().any()
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:num_real].float(), ref.float(), **tol)
    assert torch.equal(out[num_real:], torch.zeros_like(out[num_real:])), "padded rows must come out as zeros"


# Each window and each cap, alone and together, over both block sizes (interpreted kernels are slow: not every pair;
# the CPU backend's tests in test_attention.py run every pair against the same torch reference).
WINDOW_CASES = [(1, None, 1), (5, None, 16), (16, None, 1), (37, None, 16), (None, 50.0, 16), (None, 2.0, 1),
                (16, 2.0, 16), (37, 50.0, 1)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,soft_cap,block_size", WINDOW_CASES,
                         ids=[f"w{w}-cap{c}-bs{bs}" for w, c, bs in WINDOW_CASES])
def test_sliding_window_and_soft_cap_match_torch_and_never_read_before_the_window(window, soft_cap, block_size, dtype):
    run_windowed(WINDOW_SEQS, (9, 3, 64), block_size, window, soft_cap, dtype, seed=block_size + (window or 0))


@needs_triton
@pytest.mark.parametrize("kv_dtype,window,soft_cap", [(torch.int8, 37, 2.0), (torch.float8_e4m3fn, 16, 50.0)],
                         ids=["int8-w37-cap2", "fp8-w16-cap50"])
def test_sliding_window_and_soft_cap_over_a_quantized_pool(kv_dtype, window, soft_cap):
    run_windowed(WINDOW_SEQS, (4, 1, 128), 16, window, soft_cap, kv_dtype=kv_dtype, seed=3)
