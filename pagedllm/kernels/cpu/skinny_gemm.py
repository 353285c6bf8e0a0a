"""Products of a few rows by a packed weight on the CPU (csrc/skinny_gemm.cpp), in two forms.

For decode steps (1..64 rows), where oneDNN is slow at few rows: `pack` /
`linear` compute in float32 on CPUs with AVX-512 but no bf16 matrix
instructions (where oneDNN also emulates bf16), `pack_pairs` / `linear_pairs`
in bf16 dot products on CPUs with AVX-512 BF16. See the source for why and by
how much; packed_linear.py picks them by row count.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from pagedllm.kernels.cpu.build import load
from pagedllm.kernels.cpu.ops import kv_halves

_PANEL = 32  # output columns per packed panel (kPanel in the source)


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = load("skinny_gemm")
    return lib if lib is not None and lib.skinny_gemm_available() else None


def available() -> bool:
    """Whether the kernel built here: it needs AVX-512 and a C++ compiler."""
    return _lib() is not None


def pairs_native() -> bool:
    """Whether the pair kernel runs on vdpbf16ps here (AVX-512 BF16); elsewhere it emulates it, slower."""
    return available() and bool(_lib().skinny_gemm_pairs_native())


def _padded(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """weight [N, K] zero-padded to whole panels of output columns and to k inputs, and the number of panels."""
    n = weight.shape[0]
    panels = -(-n // _PANEL)
    w = torch.zeros(panels * _PANEL, k, dtype=weight.dtype)
    w[:n, : weight.shape[1]] = weight.detach()
    return w, panels


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (bf16 or float32) as panels of 32 output columns, k-major; the layout the kernel reads.

    A bf16 panel row interleaves columns j and j + 16 in one 32-bit word (low, high half).
    """
    assert weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float32)
    k = weight.shape[1]
    w, panels = _padded(weight, k)
    if weight.dtype == torch.bfloat16:
        # [panel, half, j, k] -> [panel, k, j, half]: word j of row k = (column j, column j + 16)
        return w.view(panels, 2, 16, k).permute(0, 3, 2, 1).contiguous()
    return w.view(panels, _PANEL, k).permute(0, 2, 1).contiguous()


def _out_mode(out_dtype: torch.dtype, bf16_in_float: bool) -> int:
    """The kernels' y_mode: 0 float32, 1 bf16, 2 float32 holding bf16 values."""
    if bf16_in_float:
        assert out_dtype == torch.float32, "bf16_in_float is a float32 output"
        return 2
    return int(out_dtype == torch.bfloat16)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, bf16_in_float: bool = False) -> torch.Tensor:
    """x [M, K] (bf16 or float32, rows contiguous) times the packed weight, plus a float32 bias: [M, out_features].

    out_dtype bf16 rounds each float32 sum once; float32 (the default for float32 weights) keeps it, or with
    bf16_in_float holds it rounded to bf16 (what .float() of the bf16 output gives, in one pass).
    """
    assert x.dim() == 2 and x.stride(-1) == 1 and x.dtype in (torch.bfloat16, torch.float32)
    assert x.shape[1] == packed.shape[1], f"x has {x.shape[1]} features, the weight {packed.shape[1]}"
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
    out_dtype = out_dtype or packed.dtype
    y = torch.empty(x.shape[0], out_features, dtype=out_dtype)
    _lib().skinny_gemm(x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), x.shape[0], x.shape[1], packed.data_ptr(),
                       int(packed.dtype == torch.bfloat16), out_features, 0 if bias is None else bias.data_ptr(),
                       y.data_ptr(), _out_mode(out_dtype, bf16_in_float), out_features)
    return y


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weight [N, K] as panels of 32 output columns by k pairs: [panels, ceil(K / 2), 32, 2], the operand layout
    of vdpbf16ps (word j of pair row kp = column j at k = 2kp, 2kp + 1). An odd K is padded with zeros."""
    assert weight.dim() == 2 and weight.dtype == torch.bfloat16
    pairs = -(-weight.shape[1] // 2)
    w, panels = _padded(weight, 2 * pairs)
    return w.view(panels, _PANEL, pairs, 2).permute(0, 2, 1, 3).contiguous()


def linear_pairs(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 bf16_in_float: bool = False) -> torch.Tensor:
    """x [M, in_features] (bf16, or float32 rounded to bf16; rows contiguous) times a pack_pairs weight, plus a
    float32 bias: [M, out_features], each output a float32 sum of bf16 products, rounded once for bf16 out_dtype
    (or kept in float32, and with bf16_in_float rounded to bf16 values, as for linear)."""
    _check_pairs(x, packed, in_features, bias)
    return _pairs(x, packed.data_ptr(), out_features, 0 if bias is None else bias.data_ptr(), out_dtype,
                  _out_mode(out_dtype, bf16_in_float))


def linear_pairs_silu(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up in bf16 [M, out_features // 2], where [gate, up] = linear_pairs(x, packed, ...) of a fused
    gate/up projection: the same bits as that product in bf16 then cpu_ops.silu_and_mul, in one pass and
    without the [M, out_features] intermediate. out_features // 2 must be a multiple of 32 (fuses_silu)."""
    _check_pairs(x, packed, in_features, bias)
    return _pairs_silu(x, packed.data_ptr(), out_features, 0 if bias is None else bias.data_ptr())


class PairWeight:
    """A bf16 weight [N, K] (and float32 bias) packed once for the pair kernel, called as linear_pairs and
    linear_pairs_silu are, for a layer that calls it every step: what does not change between calls (its
    pointers and sizes) is worked out here once, and each call checks only its input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = pack_pairs(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._w = self.packed.data_ptr()
        self._b = 0 if self.bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, bf16_in_float: bool = False,
                 norm: tuple | None = None) -> torch.Tensor:
        """norm: (residual or None, weight, eps) of an RMSNorm that x goes through first (see _norm_args)."""
        self._check(x)
        return _pairs(x, self._w, self.out_features, self._b, out_dtype, _out_mode(out_dtype, bf16_in_float),
                      _norm_args(x, norm))

    def silu(self, x: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        """silu(gate) * up of this gate/up projection (linear_pairs_silu), x through norm first as for __call__."""
        self._check(x)
        return _pairs_silu(x, self._w, self.out_features, self._b, _norm_args(x, norm))

    def fuses_qkv_rope(self, head_dim: int) -> bool:
        """Whether qkv_rope takes this projection's heads: whole panels of the pair kernel per head."""
        return head_dim % _PANEL == 0 and self.out_features % head_dim == 0

    def qkv_rope(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                 num_kv_heads: int, head_dim: int, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                 norm: tuple | None = None) -> torch.Tensor:
        """This fused qkv projection of x (through norm first, as for __call__) in bf16, then rotary embedding and
        the KV store as cpu_ops.rope_and_store does them on its output, in the same pass: a bf16 pool only."""
        self._check(x)
        assert kv_cache.dtype == torch.bfloat16 and kv_cache.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
        assert positions.dtype == torch.int64 and slot_mapping.dtype == torch.int64
        positions, slots = positions.contiguous(), slot_mapping.contiguous()
        n = self.out_features
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        k_ptr, v_ptr = kv_halves(kv_cache)
        if _lib().skinny_gemm_pairs_qkv_rope(x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), x.shape[0], x.shape[1],
                                             self._w, n, self._b, y.data_ptr(), n, *_norm_args(x, norm), positions.data_ptr(),
                                             cos.data_ptr(), sin.data_ptr(), num_heads, num_kv_heads, head_dim,
                                             slots.data_ptr(), k_ptr, v_ptr) != 0:
            raise ValueError(f"the fused qkv product needs head_dim a multiple of {_PANEL} and (heads + 2 kv_heads) x "
                             f"head_dim outputs, got {n} outputs for {num_heads} + 2 x {num_kv_heads} heads of {head_dim}")
        return y

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.stride(1) != 1:
            raise ValueError(f"the pair kernel takes rows of {self.in_features} contiguous features, got {tuple(x.shape)} "
                             f"with strides {x.stride()}")


def _check_pairs(x: torch.Tensor, packed: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1 and x.dtype in (torch.bfloat16, torch.float32)
    assert x.shape[1] == in_features and packed.shape[1] == -(-in_features // 2), (
        f"x has {x.shape[1]} features, the weight {in_features}")
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())


_NO_NORM = (0, 0, 0.0)


def _norm_args(x: torch.Tensor, norm: tuple | None) -> tuple[int, int, float]:
    """The kernels' last three arguments for an RMSNorm (residual or None, weight, eps) in front of the product, as
    cpu_ops.rms_norm computes it (x + residual written back to residual); all bf16, rows contiguous."""
    if norm is None:
        return _NO_NORM
    residual, weight, eps = norm
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.shape != x.shape[1:]:
        raise ValueError("a norm in front of the pair kernel takes bf16 rows and a bf16 weight of their width")
    if residual is not None and (residual.dtype != torch.bfloat16 or residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError("the residual of a norm in front of the pair kernel must be bf16, contiguous and of x's shape")
    return 0 if residual is None else residual.data_ptr(), weight.data_ptr(), float(eps)


def _pairs(x: torch.Tensor, w: int, n: int, b: int, out_dtype: torch.dtype, mode: int,
           norm: tuple[int, int, float] = _NO_NORM) -> torch.Tensor:
    """The pair kernel on checked arguments (w, b: the packed weight's and the bias's addresses, b 0 for none;
    norm: _norm_args)."""
    y = torch.empty(x.shape[0], n, dtype=out_dtype)
    _lib().skinny_gemm_pairs(x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), x.shape[0], x.shape[1], w, n, b,
                             y.data_ptr(), mode, n, *norm)
    return y


def _pairs_silu(x: torch.Tensor, w: int, n: int, b: int, norm: tuple[int, int, float] = _NO_NORM) -> torch.Tensor:
    y = torch.empty(x.shape[0], n // 2, dtype=torch.bfloat16)
    if _lib().skinny_gemm_pairs_silu(x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), x.shape[0], x.shape[1], w, n, b,
                                     y.data_ptr(), n // 2, *norm) != 0:
        raise ValueError(f"the fused SiLU product needs a gate/up projection of 2 x a multiple of {_PANEL} outputs, "
                         f"got {n}")
    return y


def fuses_silu(out_features: int) -> bool:
    """Whether linear_pairs_silu takes a gate/up projection of out_features outputs."""
    return out_features % (2 * _PANEL) == 0
