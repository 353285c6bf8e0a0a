"""Fused bfloat16 and float32 element-wise ops for the CPU (csrc/cpu_ops.cpp): residual + RMSNorm, SiLU-and-mul,
rotary + KV store; and the greedy argmax over float32 logits.

At decode batch sizes a step spent a large share of its time in torch's small
ops (15 of them per layer, each costing more in dispatch than in arithmetic;
figures in docs/cpu-performance.md). One native pass per fused step removes
most of that. bf16 rounds where transformers' bf16 code rounds; float32
computes each value as torch's float32 ops do, up to the order of the norm's
sum of squares and the last bit of exp, so that greedy outputs stay
token-identical to transformers.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from pagedllm.kernels.cpu.build import load


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    return load("cpu_ops")


_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on tensors like t: on the CPU, with the library built (each op says its dtype)."""
    return t.device.type == "cpu" and _lib() is not None


def supports(dtype: torch.dtype) -> bool:
    """The dtypes of the element-wise kernels: bf16 and float32."""
    return dtype in _SUFFIX


@lru_cache(maxsize=None)
def _fn(name: str, dtype: torch.dtype):
    """The kernel `name` for dtype, looked up once: it is called several times per layer and step."""
    return getattr(_lib(), f"{name}_{_SUFFIX[dtype]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm of x [T, dim]; with a residual, of x + residual, which is also written into residual.

    A bf16 model (weight and residual bf16) may take x in float32, a widened projection's
    unrounded output, rounded to bf16 as it is read; and out_dtype float32 gives the bf16
    result's values in float32, for a widened projection to read (kernels/cpu/packed_linear.py).
    """
    out_dtype = out_dtype or weight.dtype
    assert x.stride(-1) == 1 and weight.is_contiguous()
    assert residual is None or (residual.is_contiguous() and residual.shape == x.shape and residual.dtype == weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype)
    res = 0 if residual is None else residual.data_ptr()
    if x.dtype == out_dtype == weight.dtype:
        _fn("rms_norm", x.dtype)(x.data_ptr(), x.stride(0), res, weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    else:
        assert weight.dtype == torch.bfloat16 and {x.dtype, out_dtype} <= {torch.bfloat16, torch.float32}
        _lib().rms_norm_bf16_widened(x.data_ptr(), int(x.dtype == torch.float32), x.stride(0), res, weight.data_ptr(),
                                     out.data_ptr(), int(out_dtype == torch.float32), x.shape[0], x.shape[1], eps)
    return out


def silu_and_mul(x: torch.Tensor, bf16_in_float: bool = False) -> torch.Tensor:
    """silu(gate) * up, where x [T, 2 * inter] holds gate then up.

    bf16_in_float: x is a bf16 model's activations carried in float32 (a projection
    computed in float32, not yet rounded: kernels/cpu/packed_linear.py); they are rounded
    as bf16 code rounds them, and the result is bf16 values in float32.
    """
    x = x.contiguous()
    inter = x.shape[-1] // 2
    out = torch.empty((x.shape[0], inter), dtype=x.dtype)
    if x.dtype == torch.float32:
        _lib().silu_and_mul_f32(x.data_ptr(), out.data_ptr(), x.shape[0], inter, int(bf16_in_float))
    else:
        assert x.dtype == torch.bfloat16 and not bf16_in_float
        _lib().silu_and_mul_bf16(x.data_ptr(), out.data_ptr(), x.shape[0], inter)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for float32 CPU logits [rows, vocab], in one pass; the library must be built."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[1] > 0
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _lib().argmax_rows_f32(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr())
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: -inf in logits[r, t] for each r in rows whose bitmask bit t is 0 (xgrammar's int32 bitmask)."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(-1) == 1
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.shape[1] * 32 >= logits.shape[1]
    idx = torch.tensor(rows, dtype=torch.int64)
    _lib().apply_token_bitmask_f32(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.shape[1],
                                   idx.data_ptr(), len(rows), logits.shape[1])


def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, slot_mapping: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Rotate the queries and keys of qkv [T, (heads + 2 kv_heads) * head_dim] in place; store keys and values at their slots.

    kv_cache: [2, blocks, block_size, kv_heads, head_dim] in qkv's dtype, or an int8 pool [2, blocks, block_bytes]
    (model/attention/kv_quant.py), into which keys and values are quantized as they are stored. Slot -1 stores nothing.
    """
    assert qkv.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous() and kv_cache.is_contiguous()
    assert positions.dtype == torch.int64 and slot_mapping.dtype == torch.int64
    positions, slots = positions.contiguous(), slot_mapping.contiguous()
    args = (qkv.data_ptr(), qkv.stride(0), qkv.shape[0], positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            num_heads + num_kv_heads, num_kv_heads, head_dim, slots.data_ptr(), *kv_halves(kv_cache))
    if kv_cache.dtype == torch.int8:
        block_bytes = kv_cache.shape[2]
        _fn("rope_store_int8", qkv.dtype)(*args, block_bytes, block_bytes // (num_kv_heads * (head_dim + 2)))
    else:
        assert kv_cache.dtype == qkv.dtype
        _fn("rope_store", qkv.dtype)(*args)


def kv_halves(kv_cache: torch.Tensor) -> tuple[int, int]:
    """The addresses of a contiguous pool's keys and values (kv_cache[0], kv_cache[1]), without making the two views."""
    k = kv_cache.data_ptr()
    return k, k + kv_cache.stride(0) * kv_cache.element_size()
