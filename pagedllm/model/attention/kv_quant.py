"""A quantized KV cache: one byte per key or value element, and a float16 scale per token and KV head.

A block's scales live in the block's own memory, right after its values, so a
block id still names one unit of the pool: sharing, copy-on-write (whole
blocks copied) and prefix caching treat it as they treat a bf16 block. One
layer's pool is one tensor of shape [2, num_blocks, block_bytes] (keys, then
values), each block of each half laid out as

    values  [block_size, kv_heads, head_dim]   int8, or fp8 e4m3 (CUDA)
    scales  [block_size, kv_heads]             float16

Quantization is symmetric, per token and KV head: scale = max|x| / QMAX
(127 for int8, 448 for fp8), kept in float16 (11 significant bits, so the
scale adds little to the rounding of the values themselves), and a value is
x / scale rounded to the nearest int8 (or cast to fp8), within +-QMAX. With a
head size of 64 a token's keys and values take 132 bytes per KV head against
256 in bf16: 1.94x the tokens in the same memory.

The attention kernels read values and scales in place (kernels/cpu/csrc and the
Triton kernels); the torch functions here are the reference they are tested
against, and the torch backend's path.
"""

from __future__ import annotations

import torch

from pagedllm.config import KV_CACHE_DTYPES

_QUANTIZED = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_SCALE_BYTES = 2  # float16
_MIN_SCALE = 2.0**-24  # float16's smallest subnormal: an all-zero row keeps a finite, nonzero scale
_MAX_SCALE = 65504.0  # float16's largest


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The pool's element dtype: the model's for "auto", else the quantized one (fp8 only on CUDA)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if name == "auto":
        return model_dtype
    dtype = _QUANTIZED[name]
    if dtype == torch.float8_e4m3fn and device.type != "cuda":
        raise ValueError(f"kv_cache_dtype={name!r} needs CUDA (its kernels are Triton's); on the CPU use kv_cache_dtype='int8'")
    return dtype


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def block_bytes(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one block of one half (keys or values) of a quantized pool: values, then scales."""
    return block_size * num_kv_heads * (head_dim + _SCALE_BYTES)


def pool_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, ...]:
    if is_quantized(dtype):
        return (2, num_blocks, block_bytes(block_size, num_kv_heads, head_dim))
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def split(cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a quantized pool: values [2, blocks, block_size, kv_heads, head_dim] and float16 scales [2, blocks, block_size, kv_heads]."""
    two, num_blocks, nbytes = cache.shape
    assert head_dim % 2 == 0, "a quantized pool needs an even head size (its float16 scales stay aligned)"
    block_size = nbytes // (num_kv_heads * (head_dim + _SCALE_BYTES))
    assert nbytes == block_bytes(block_size, num_kv_heads, head_dim), "not a quantized pool of this shape"
    n_values = block_size * num_kv_heads * head_dim
    values = cache[:, :, :n_values].view(two, num_blocks, block_size, num_kv_heads, head_dim)
    scales = cache[:, :, n_values:].view(torch.int8).view(torch.float16).view(two, num_blocks, block_size, num_kv_heads)
    return values, scales


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (values in dtype, float16 scales [...]): symmetric, one scale per row."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp(_MIN_SCALE, _MAX_SCALE).to(torch.float16)
    q = (xf / scale.float().unsqueeze(-1)).clamp(-qmax, qmax)
    if dtype == torch.int8:
        q = q.round()
    return q.to(dtype), scale


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [..., head_dim] times scales [...], in float32, then cast to dtype."""
    return (values.float() * scales.float().unsqueeze(-1)).to(dtype)


def store(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize k, v ([T, kv_heads, head_dim]) into a quantized pool at their slots; slot -1 stores nothing."""
    num_kv_heads, head_dim = k.shape[-2:]
    # Indexed writes go through the bytes: torch does not index every 8-bit float type.
    values, scales = split(cache.view(torch.int8), num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    block_size = values.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for i, x in ((0, k), (1, v)):
        q, s = quantize(x, cache.dtype)
        values[i][blocks, offsets] = q.view(torch.int8)
        scales[i][blocks, offsets] = s


def gather(cache: torch.Tensor, half: int, block_tables: torch.Tensor, num_tokens: int, num_kv_heads: int, head_dim: int,
           dtype: torch.dtype) -> torch.Tensor:
    """Keys (half 0) or values (half 1) of sequences as contiguous [B, num_tokens, kv_heads, head_dim] in dtype, via their block tables."""
    values, scales = split(cache.view(torch.int8), num_kv_heads, head_dim)
    block_size = values.shape[2]
    nblocks = -(-num_tokens // block_size)
    b = block_tables.shape[0]
    index = block_tables[:, :nblocks].reshape(-1).to(torch.int64)
    x = dequantize(values[half].index_select(0, index).view(cache.dtype), scales[half].index_select(0, index), dtype)
    return x.view(b, nblocks * block_size, num_kv_heads, head_dim)[:, :num_tokens]
