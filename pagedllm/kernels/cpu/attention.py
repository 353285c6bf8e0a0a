"""Native CPU attention kernels (csrc/paged_attention.cpp: decode; csrc/prefill_attention.cpp:
prefill), built and loaded by build.py.

Where they cannot be built, `load()` returns None and the torch backend is
used: slower, never wrong.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from pagedllm.kernels.cpu import build
from pagedllm.kernels.cpu.ops import kv_halves

_ENTRY_POINTS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
_INT8_ENTRY_POINTS = {torch.float32: "paged_decode_int8_f32", torch.bfloat16: "paged_decode_int8_bf16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled decode kernels, or None where they cannot be built here (see build.py)."""
    return build.load("paged_attention")


def _window_args(window: int | None, soft_cap: float | None) -> tuple[int, float]:
    """The kernels' last two arguments: the sliding window and the soft cap, 0 for none."""
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    return int(window or 0), float(soft_cap or 0.0)


def supports(dtype: torch.dtype, kv_dtype: torch.dtype | None = None, head_dim: int = 64) -> bool:
    """Whether the decode kernel takes queries in dtype over a pool of kv_dtype (default: the same dtype)."""
    if dtype not in _ENTRY_POINTS or load() is None:
        return False
    if kv_dtype is None or kv_dtype == dtype:
        return True
    return kv_dtype == torch.int8 and bool(load().paged_decode_int8_supported(head_dim))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_kv_heads: int | None = None, window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """One query token per sequence against its cached keys/values, read through its block table.

    q [B, heads, head_dim], each sequence's heads contiguous (sequences may lie
    further apart: a slice of the fused qkv projection is read in place);
    kv_cache [2, blocks, block_size, kv_heads, head_dim] in q's dtype, or an int8
    pool [2, blocks, block_bytes] (model/attention/kv_quant.py; check supports first; give num_kv_heads); block_tables
    [B, max_blocks] int32; seq_lens [B] int32 (0 = a padding row, whose output
    is zeros). window: attend to the last `window` positions only (None: all);
    the block-table entries before max(0, seq_len - window) // block_size are
    never read, so they may be stale. soft_cap: scores s become
    soft_cap * tanh(s / soft_cap) (None: plain). Returns [B, heads, head_dim] in q's dtype.
    """
    lib = load()
    num_seqs, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    lens = seq_lens.contiguous()
    assert kv_cache.is_contiguous() and tables.dtype == torch.int32 and lens.dtype == torch.int32
    out = torch.empty(q.shape, dtype=q.dtype)
    k_ptr, v_ptr = kv_halves(kv_cache)
    extra = _window_args(window, soft_cap)
    if kv_cache.dtype == torch.int8:
        block_bytes = kv_cache.shape[2]
        assert num_kv_heads is not None, "an int8 pool does not say its number of KV heads: pass num_kv_heads"
        rc = getattr(lib, _INT8_ENTRY_POINTS[q.dtype])(
            q.data_ptr(), q.stride(0), k_ptr, v_ptr, block_bytes, tables.data_ptr(), tables.stride(0), lens.data_ptr(),
            out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_bytes // (num_kv_heads * (head_dim + 2)), scale,
            *extra)
        if rc != 0:
            raise ValueError(f"the int8 decode kernel does not support head_dim={head_dim} here (check supports)")
        return out
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.dtype == q.dtype
    getattr(lib, _ENTRY_POINTS[q.dtype])(q.data_ptr(), q.stride(0), k_ptr, v_ptr, tables.data_ptr(), tables.stride(0),
                                         lens.data_ptr(), out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim,
                                         block_size, scale, *extra)
    return out



@lru_cache(maxsize=1)
def load_prefill() -> ctypes.CDLL | None:
    """The compiled prefill kernel, or None where it cannot be built here."""
    return build.load("prefill_attention")


@lru_cache(maxsize=None)
def supports_prefill(dtype: torch.dtype, head_dim: int, kv_dtype: torch.dtype | None = None) -> bool:
    """Only bf16 queries on AVX-512 CPUs (with or without its BF16 instructions), head sizes 64 or 128, over a
    bf16 or int8 pool: elsewhere torch's fp32 SDPA."""
    lib = load_prefill() if dtype == torch.bfloat16 and kv_dtype in (None, torch.bfloat16, torch.int8) else None
    return lib is not None and bool(lib.paged_prefill_bf16_supported(head_dim))


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, num_kv_heads: int | None = None,
                  window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step, keys and values read in place from the pool.

    q [T, heads, head_dim] bf16, the prefill rows only; sequence s owns rows
    query_start_loc[s]:query_start_loc[s + 1] (int32 [S + 1], starting at 0),
    the last of which sits at position seq_lens[s] - 1 (int32 [S]); its earlier
    keys, and this chunk's, are already in kv_cache [2, blocks, block_size,
    kv_heads, head_dim] at block_tables [S, max_blocks] int32, or in an int8 pool
    [2, blocks, block_bytes] (model/attention/kv_quant.py; give num_kv_heads). q's tokens may be
    strided (a view into the fused QKV projection: no copy). Writes into `out`
    ([T, heads, head_dim], contiguous) when given. window and soft_cap as for
    paged_decode: with a window, a chunk reads nothing before its first query's
    window. Check supports_prefill first.
    """
    lib = load_prefill()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:  # each token's heads must be dense; tokens may be strided
        q = q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    qsl, lens = query_start_loc.contiguous(), seq_lens.contiguous()
    num_tokens, num_heads, head_dim = q.shape
    int8 = kv_cache.dtype == torch.int8
    if int8:
        assert num_kv_heads is not None, "an int8 pool does not say its number of KV heads: pass num_kv_heads"
        block_size = kv_cache.shape[2] // (num_kv_heads * (head_dim + 2))
    else:
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.is_contiguous() and q.dtype == torch.bfloat16 and kv_cache.dtype in (torch.bfloat16, torch.int8)
    assert tables.dtype == qsl.dtype == lens.dtype == torch.int32 and qsl.shape[0] == lens.shape[0] + 1 == tables.shape[0] + 1
    assert int(qsl[-1]) == num_tokens, "query_start_loc must end at q's row count"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    pools = (kv_cache[0].data_ptr(), kv_cache[1].data_ptr()) + ((kv_cache.shape[2],) if int8 else ())
    fn = lib.paged_prefill_int8_bf16 if int8 else lib.paged_prefill_bf16
    rc = fn(q.data_ptr(), q.stride(0), *pools, tables.data_ptr(), tables.stride(0), qsl.data_ptr(), lens.data_ptr(),
            out.data_ptr(), lens.shape[0], num_heads, num_kv_heads, head_dim, block_size, scale, *_window_args(window, soft_cap))
    if rc != 0:
        raise ValueError(f"the native prefill kernel does not support head_dim={head_dim} here (check supports_prefill)")
    return out
