"""Native CPU attention kernels (csrc/paged_attention.cpp), built and loaded by model/native.py.

Where they cannot be built, `load()` returns None and the torch backend is
used: slower, never wrong.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from pagedllm.model.native import load_library

_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_ENTRY_POINTS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (see model/native.py)."""
    lib = load_library(_SOURCE, fast_math=True)
    if lib is None:
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    for name in _ENTRY_POINTS.values():
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i32, f32]
        fn.restype = None
    return lib


def supports(dtype: torch.dtype) -> bool:
    return dtype in _ENTRY_POINTS and load() is not None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached keys/values, read through its block table.

    q [B, heads, head_dim]; kv_cache [2, blocks, block_size, kv_heads, head_dim];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (0 = a padding row,
    whose output is zeros). Returns [B, heads, head_dim] in q's dtype.
    """
    lib = load()
    fn = getattr(lib, _ENTRY_POINTS[q.dtype])
    q = q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    lens = seq_lens.contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    assert kv_cache.is_contiguous() and kv_cache.dtype == q.dtype and tables.dtype == torch.int32 and lens.dtype == torch.int32
    out = torch.empty_like(q)
    fn(q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
       out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale)
    return out
