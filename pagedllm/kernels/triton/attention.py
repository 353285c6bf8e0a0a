"""Triton kernels for paged attention: store new keys/values, then attend through block tables.

Only `model/attention/triton_backend.py` imports this module, and only when the triton backend
is chosen: importing pagedllm never needs triton.

Both launches are CUDA-graph friendly: their grids and constexprs come from
tensor shapes and the model's static config, and nothing here reads a device
tensor on the host. A padded row (slot -1, seq_len 0, one query token) stores
nothing, reads no key and comes out as zeros.

The attention kernel follows the shape of vLLM's triton "unified attention":
one launch for a flat batch of prefills, prefill chunks and decodes. The grid
runs over query tiles and KV heads; each program finds its sequence with a
binary search over `query_start_loc`, so the grid depends only on the number
of tokens and of sequences. A tile holds BLOCK_Q query tokens times the GROUP
query heads that share one KV head, so each K/V tile is loaded once for the
whole group. Softmax is online (running max and sum in float32, base 2).

A sliding-window layer (SLIDING) starts each tile's key loop at its first
query's window, so no key or value before it is read (the engine may have
given those blocks back to the pool) and a long context costs only the window;
keys before each row's own window are masked. A soft-capped layer (SOFT_CAP,
Gemma 2) turns each scaled score s into cap * tanh(s / cap) before the mask.
Both are constexpr flags: without them the kernel compiles as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.model.attention import kv_quant

LOG2E = 1.4426950408889634
TILE_N = 32  # keys per step of the attention loop; any KV block size works (each key looks up its own block)
_RNE = 12582912.0  # 1.5 * 2^23: (x + _RNE) - _RNE rounds a float32 |x| < 2^22 to the nearest integer, ties to even


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    KVH_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding: nothing to store
        return
    h = tl.arange(0, KVH_P)[:, None]
    d = tl.arange(0, HEAD_DIM_P)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest fp8 e4m3 value, ties to even, in float32.

    Casting that to fp8 is then exact. The cast alone rounds the same way on a
    GPU, but triton's interpreter rounds a value that crosses a power of two
    down to the binade below (127 -> 64), so the tests on the CPU would not
    check what a GPU computes.
    """
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits; 2^-9 below 2^-6
    return ((x / step + _RNE) - _RNE) * step


@triton.jit
def _store_kv_quant_kernel(
    k_ptr, v_ptr, k_val_ptr, v_val_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, block_bytes,
    QMAX: tl.constexpr, IS_INT8: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    KVH_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Quantize one token's keys and values per KV head into a quantized pool (model/attention/kv_quant.py's layout)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, KVH_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    block, in_block = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    val_off = block * block_bytes + (in_block * NUM_KV_HEADS + h[:, None]) * HEAD_DIM + d[None, :]
    # The scales follow the block's values; in float16 units.
    scale_off = block * (block_bytes // 2) + (BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM) // 2 + in_block * NUM_KV_HEADS + h
    for half in tl.static_range(2):
        if half == 0:
            x = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.minimum(tl.maximum(amax / QMAX, 5.9604644775390625e-8), 65504.0).to(tl.float16)
        q = tl.minimum(tl.maximum(x / scale.to(tl.float32)[:, None], -QMAX), QMAX)
        if IS_INT8:
            q = ((q + _RNE) - _RNE).to(tl.int8)
        else:
            q = _round_to_e4m3(q)
        if half == 0:
            tl.store(k_val_ptr + val_off, q.to(k_val_ptr.dtype.element_ty), mask=mask)
            tl.store(k_scale_ptr + scale_off, scale, mask=h < NUM_KV_HEADS)
        else:
            tl.store(v_val_ptr + val_off, q.to(v_val_ptr.dtype.element_ty), mask=mask)
            tl.store(v_scale_ptr + scale_off, scale, mask=h < NUM_KV_HEADS)


def _quant_halves(kv_cache: torch.Tensor):
    """A quantized pool's keys and values (as their 8-bit type) and scales (as float16), each [blocks, bytes or halves]."""
    scales = kv_cache.view(torch.int8).view(torch.float16)
    return kv_cache[0], kv_cache[1], scales[0], scales[1]


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v ([T, kv_heads, head_dim]) into kv_cache [2, blocks, block_size, kv_heads, head_dim] at their slots,
    or quantize them into a quantized pool [2, blocks, block_bytes] (int8 or fp8: model/attention/kv_quant.py)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.is_contiguous()
    if kv_quant.is_quantized(kv_cache.dtype):
        kval, vval, kscale, vscale = _quant_halves(kv_cache)
        block_bytes = kv_cache.shape[2]
        _store_kv_quant_kernel[(num_tokens,)](
            k, v, kval, vval, kscale, vscale, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), block_bytes,
            QMAX=kv_quant.QMAX[kv_cache.dtype], IS_INT8=kv_cache.dtype == torch.int8,
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            KVH_P=triton.next_power_of_2(num_kv_heads), HEAD_DIM_P=triton.next_power_of_2(head_dim),
            BLOCK_SIZE=block_bytes // (num_kv_heads * (head_dim + 2)),
        )
        return
    kc, vc = kv_cache[0], kv_cache[1]
    _store_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        KVH_P=triton.next_power_of_2(num_kv_heads), HEAD_DIM_P=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kc.shape[1],
    )


@triton.jit
def _tanh(x):
    """tanh in float32 from exp2: (1 - e) / (1 + e) with e = 2^(-2 |x| log2(e)) <= 1, the sign put back."""
    e = tl.exp2(-2.0 * LOG2E * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile index, query_start_loc[s] // BLOCK_Q + s, is <= pid."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, qk_scale,  # qk_scale = softmax scale * log2(e): the loop uses exp2
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    k_scale_ptr, v_scale_ptr,  # a quantized pool's float16 scales (QUANT); stride_cb is then its block_bytes
    window, soft_cap,  # SLIDING: a query at p sees keys p - window + 1 .. p; SOFT_CAP: the cap times log2(e)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
    QUANT: tl.constexpr, NUM_KV_HEADS: tl.constexpr, SLIDING: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = pid - (q_start // BLOCK_Q + seq)  # this program's tile within its sequence
    if q_tile * BLOCK_Q >= q_len:  # a spare tile: the grid reserves one more per sequence than it may need
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens in the cache before this step's queries

    # Row m of the tile is query token m // GROUP of the tile and query head kv_head * GROUP + m % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)  # rows past BLOCK_Q * GROUP are the next tile's: never stored
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    q_off = (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    qpos = context + tok  # absolute position of each row's query: it sees keys 0..qpos
    # Keys this tile can see: up to its last valid query's position (none for a padded row).
    last_tok = tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    num_keys = tl.minimum(seq_len, context + last_tok + 1)
    cols = tl.arange(0, TILE)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if SLIDING:  # from the tile's first query's window on: nothing before it is read
        first_key = tl.maximum(context + q_tile * BLOCK_Q - window + 1, 0)
    else:
        first_key = 0
    for start in range(first_key, num_keys, TILE):
        kpos = start + cols
        key_ok = kpos < num_keys
        block = tl.load(table + kpos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (kpos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [TILE, D]
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if QUANT:  # one byte per element, times its token's and head's scale, read back in q's dtype
            s_off = block * (stride_cb // 2) + (BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM) // 2 + (kpos % BLOCK_SIZE) * NUM_KV_HEADS + kv_head
            ks = tl.load(k_scale_ptr + s_off, mask=key_ok, other=0.0).to(tl.float32)
            vs = tl.load(v_scale_ptr + s_off, mask=key_ok, other=0.0).to(tl.float32)
            k = (k.to(tl.float32) * ks[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if SOFT_CAP:  # in log2 units, as s is: cap * log2(e) * tanh(s / (cap * log2(e)))
            s = soft_cap * _tanh(s / soft_cap)
        visible = row_ok[:, None] & key_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        if SLIDING:
            visible = visible & (kpos[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked rows see no key: no inf - inf, no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # rows that saw no key (padding) stay zero
    o_off = (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def tile_rows(group: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows per program, a power of two >= 16 for tl.dot, and the query tokens they hold."""
    block_m = max(16, triton.next_power_of_2(group))
    return block_m, block_m // group


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32, query_start_loc[B] == T
    scale: float,
    num_kv_heads: int | None = None,
    window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of every query token over its own sequence's cached keys, in one launch.

    kv_cache may be a quantized pool [2, blocks, block_bytes] (kv_quant.py); num_kv_heads must then be given.
    window: each query attends to the last `window` positions only, and the block-table entries before a
    chunk's first query's window are never read (None: all). soft_cap: scores s become soft_cap * tanh(s / soft_cap).
    """
    num_tokens, num_heads, head_dim = q.shape
    quant = kv_quant.is_quantized(kv_cache.dtype)
    if not quant:
        num_kv_heads = kv_cache.shape[3]
    assert num_kv_heads is not None, "a quantized pool does not say its number of KV heads: pass num_kv_heads"
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and kv_cache.is_contiguous() and block_tables.stride(-1) == 1
    group = num_heads // num_kv_heads
    block_m, block_q = tile_rows(group)
    if quant:
        kc, vc, ks, vs = _quant_halves(kv_cache)
        block_bytes = kv_cache.shape[2]
        block_size = block_bytes // (num_kv_heads * (head_dim + 2))
        strides = (block_bytes, num_kv_heads * head_dim, head_dim)
    else:
        kc, vc = kv_cache[0], kv_cache[1]
        ks = vs = kc  # unused
        block_size = kc.shape[1]
        strides = (kc.stride(0), kc.stride(1), kc.stride(2))
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)  # a sequence of n queries needs at most n // BLOCK_Q + 1 tiles
    _paged_attention_kernel[grid](
        out, q, kc, vc, block_tables, seq_lens, query_start_loc,
        num_seqs, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *strides, block_tables.stride(0), ks, vs, window or 0, (soft_cap or 1.0) * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, TILE=TILE_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models get fp32 dot products, not TF32
        QUANT=quant, NUM_KV_HEADS=num_kv_heads, SLIDING=window is not None, SOFT_CAP=soft_cap is not None,
    )
    return out
