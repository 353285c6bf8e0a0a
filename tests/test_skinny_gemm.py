"""The skinny kernels (decode-sized products: float32 FMAs on widened weights, and bf16 pair dot products) against
a float64 reference. The pair kernel runs on vdpbf16ps where the CPU has AVX-512 BF16 and emulates it elsewhere,
so both are tested on every AVX-512 machine."""

from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.cpu import skinny_gemm
from pagedllm.kernels.cpu.packed_linear import PAIR_ROWS, _SKINNY_ROWS, PackedLinear, can_pack

pytestmark = pytest.mark.skipif(not skinny_gemm.available(), reason="the skinny kernel needs AVX-512 and a C++ compiler")


def float32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far a float32 sum over K may stray from the exact one: K ulps of the sum of |products|."""
    return (x.double().abs() @ w.double().abs().t()) * x.shape[1] * 2.0**-24 + 1e-30


class Kernel:
    """One of the two kernels behind one call: pack a weight, multiply by it."""

    def __init__(self, pairs: bool) -> None:
        self.pairs = pairs

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        return skinny_gemm.pack_pairs(w) if self.pairs else skinny_gemm.pack(w)

    def linear(self, x, packed, n, k, bias=None, out_dtype=torch.bfloat16):
        if self.pairs:
            return skinny_gemm.linear_pairs(x, packed, n, k, bias, out_dtype)
        return skinny_gemm.linear(x, packed, n, bias, out_dtype)


KERNELS = {"widen": Kernel(False), "pairs": Kernel(True)}


@pytest.mark.parametrize("rows", [1, 5, 12, 13, 30, 64])
@pytest.mark.parametrize("n,k", [(50, 37), (96, 576), (577, 64)])
@pytest.mark.parametrize("kernel,w_dtype", [("widen", torch.bfloat16), ("widen", torch.float32), ("pairs", torch.bfloat16)])
def test_float32_product_within_the_float32_bound(rows, n, k, kernel, w_dtype):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=g).to(w_dtype)
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k + 5, generator=g).to(w_dtype)[:, :k]  # rows further apart than K: a strided input
    exact = x.double() @ w.double().t() + bias.double()
    kern = KERNELS[kernel]
    y = kern.linear(x, kern.pack(w), n, k, bias, torch.float32)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= float32_bound(x, w) + bias.double().abs() * 2.0**-23).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_bf16_output_is_the_float32_output_rounded_once(kernel, x_dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(70, 96, generator=g).to(torch.bfloat16)
    x = torch.randn(9, 96, generator=g).to(torch.bfloat16).to(x_dtype)
    kern = KERNELS[kernel]
    packed = kern.pack(w)
    y32 = kern.linear(x, packed, 70, 96, None, torch.float32)
    y16 = kern.linear(x, packed, 70, 96, None, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))


def test_the_pair_kernel_rounds_a_float32_input_to_bf16():
    """A bf16 layer's input is bf16: float32 rows are rounded first, and give what their bf16 rounding gives."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 33, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 33, generator=g)
    packed = skinny_gemm.pack_pairs(w)
    assert torch.equal(skinny_gemm.linear_pairs(x, packed, 40, 33), skinny_gemm.linear_pairs(x.to(torch.bfloat16), packed, 40, 33))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_gives_the_same_bits_alone_or_in_any_batch(kernel):
    """One sum per output in k order, whatever the tile: batch composition never changes a sequence's result."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(100, 200, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 200, generator=g).to(torch.bfloat16)
    kern = KERNELS[kernel]
    packed = kern.pack(w)
    full = kern.linear(x, packed, 100, 200)
    for lo, hi in [(0, 1), (7, 8), (3, 16), (13, 40)]:
        assert torch.equal(kern.linear(x[lo:hi], packed, 100, 200), full[lo:hi])


def test_zero_rows_and_a_mismatched_input():
    w = torch.randn(32, 16).to(torch.bfloat16)
    packed = skinny_gemm.pack(w)
    assert skinny_gemm.linear(torch.empty(0, 16, dtype=torch.bfloat16), packed, 32).shape == (0, 32)
    with pytest.raises(AssertionError, match="features"):
        skinny_gemm.linear(torch.zeros(2, 17, dtype=torch.bfloat16), packed, 32)
    pairs = skinny_gemm.pack_pairs(w)
    assert skinny_gemm.linear_pairs(torch.empty(0, 16, dtype=torch.bfloat16), pairs, 32, 16).shape == (0, 32)
    with pytest.raises(AssertionError, match="features"):
        skinny_gemm.linear_pairs(torch.zeros(2, 18, dtype=torch.bfloat16), pairs, 32, 18)


@pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)), reason="torch has no oneDNN here")
@pytest.mark.parametrize("upcast,round_output", [(True, True), (True, False), (False, True)])
def test_linear_uses_its_skinny_kernel_up_to_its_row_limit_and_agrees_with_onednn(upcast, round_output):
    """Widened layers (no AVX-512 BF16) take the float32 kernel, native bf16 ones the pair kernel."""
    if not upcast and not skinny_gemm.pairs_native():
        pytest.skip("decode layers use the pair kernel only with AVX-512 BF16")
    g = torch.Generator().manual_seed(3)
    k = 96 if upcast else 576
    w = torch.randn(160, k, generator=g).to(torch.bfloat16)
    b = torch.randn(160, generator=g).to(torch.bfloat16)
    lin = PackedLinear(w, b, upcast=upcast)
    limit = _SKINNY_ROWS if upcast else PAIR_ROWS
    x = torch.randn(limit + 1, k, generator=g).to(torch.bfloat16)
    out_dtype = torch.bfloat16 if round_output else torch.float32
    with torch.inference_mode():
        big = lin(x, round_output=round_output)  # one row too many: oneDNN
        small = lin(x[:limit], round_output=round_output)
    if upcast:
        direct = skinny_gemm.linear(x[:limit], lin.skinny, 160, lin.bias, out_dtype)
    else:
        direct = skinny_gemm.linear_pairs(x[:limit], lin.pairs, 160, k, b.float())
    assert big.dtype == small.dtype == out_dtype and torch.equal(small, direct)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())[:limit]
    bound = float32_bound(x[:limit], w) + b.double().abs() * 2.0**-23
    if round_output:
        bound = bound + exact.abs() * 2.0**-8  # and one bf16 rounding
    assert ((small.double() - exact).abs() <= bound).all()
    assert (small == big[:limit]).float().mean() >= 0.98  # the two kernels differ in the order of the sums only


@pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)), reason="torch has no oneDNN here")
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 64, 65])
def test_logits_in_float32_are_the_bf16_output_widened(upcast, rows):
    """An LM head's float32 logits straight from the kernel: the same values as its bf16 output, widened."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(300, 96, generator=g).to(torch.bfloat16)
    lin = PackedLinear(w, None, upcast=upcast)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        logits = lin.logits(x)
        assert logits.dtype == torch.float32 and torch.equal(logits, lin(x).float())


@pytest.mark.parametrize("rows", [1, 7, 12, 13, 48, 64])
@pytest.mark.parametrize("k,inter", [(576, 1536), (100, 64), (64, 32)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_silu_product_has_the_bits_of_the_product_then_silu_and_mul(rows, k, inter, x_dtype, bias):
    from pagedllm.kernels.cpu import ops

    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(2 * inter, k, generator=g).mul_(0.05).bfloat16()
    b = torch.randn(2 * inter, generator=g) if bias else None
    packed = skinny_gemm.pack_pairs(w)
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    expected = ops.silu_and_mul(skinny_gemm.linear_pairs(x, packed, 2 * inter, k, b))
    assert torch.equal(skinny_gemm.linear_pairs_silu(x, packed, 2 * inter, k, b), expected)


def test_the_fused_silu_product_takes_whole_panels_only():
    assert skinny_gemm.fuses_silu(2 * 1536) and not skinny_gemm.fuses_silu(2 * 48)
    w = torch.randn(96, 64).bfloat16()
    with pytest.raises(ValueError, match="multiple of 32"):
        skinny_gemm.linear_pairs_silu(torch.randn(2, 64).bfloat16(), skinny_gemm.pack_pairs(w), 96, 64)


@pytest.mark.skipif(not skinny_gemm.pairs_native(), reason="PackedLinear uses the pair kernel with AVX-512 BF16 only")
@pytest.mark.parametrize("rows", [1, 48, PAIR_ROWS + 1])
def test_packed_silu_and_mul_fuses_decode_rows_and_falls_back_above(rows, monkeypatch):
    from pagedllm.kernels.cpu import ops

    w = torch.randn(2 * 64, 96).mul_(0.05).bfloat16()
    layer = PackedLinear(w, None)
    assert layer.fuses_silu
    x = torch.randn(rows, 96).bfloat16()
    calls = []
    fused = skinny_gemm._pairs_silu
    monkeypatch.setattr(skinny_gemm, "_pairs_silu", lambda *a: calls.append(1) or fused(*a))
    y = layer.silu_and_mul(x, ops.silu_and_mul)
    assert torch.equal(y, ops.silu_and_mul(layer(x)))
    assert bool(calls) == (rows <= PAIR_ROWS)


@pytest.mark.parametrize("rows", [1, 5, 13, 48])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 32), (2, 1, 128)])
@pytest.mark.parametrize("bias,residual", [(False, True), (True, False)])
def test_the_qkv_product_with_rope_and_kv_store_has_the_bits_of_the_three_steps(rows, heads, kv_heads, head_dim, bias,
                                                                             residual):
    from pagedllm.kernels.cpu import ops

    g = torch.Generator().manual_seed(rows + head_dim)
    k, n = 96, (heads + 2 * kv_heads) * head_dim
    weight = skinny_gemm.PairWeight(torch.randn(n, k, generator=g).mul_(0.05).bfloat16(),
                                    torch.randn(n, generator=g) if bias else None)
    x = torch.randn(rows, k, generator=g).bfloat16()
    norm_w = torch.randn(k, generator=g).mul_(0.3).add_(1).bfloat16()
    res = torch.randn(rows, k, generator=g).bfloat16()
    cos, sin = torch.randn(512, head_dim, generator=g).bfloat16(), torch.randn(512, head_dim, generator=g).bfloat16()
    positions = torch.randint(0, 512, (rows,), generator=g)
    slots = torch.randperm(40 * 16, generator=g)[:rows]
    slots[0] = -1  # a padding row: stores nothing
    pools = [torch.zeros(2, 40, 16, kv_heads, head_dim).bfloat16() for _ in range(2)]
    residuals = [res.clone() if residual else None for _ in range(2)]
    expected = weight(x, norm=(residuals[0], norm_w, 1e-5))
    ops.rope_and_store(expected, positions, cos, sin, heads, kv_heads, head_dim, slots, pools[0])
    got = weight.qkv_rope(x, positions, cos, sin, heads, kv_heads, head_dim, slots, pools[1], norm=(residuals[1], norm_w, 1e-5))
    assert torch.equal(got, expected) and torch.equal(pools[1], pools[0])
    assert not residual or torch.equal(residuals[1], residuals[0])


def test_the_qkv_product_with_rope_takes_whole_panels_per_head():
    weight = skinny_gemm.PairWeight(torch.randn(3 * 8, 16).bfloat16())
    assert not weight.fuses_qkv_rope(8)
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        weight.qkv_rope(torch.randn(1, 16).bfloat16(), torch.zeros(1, dtype=torch.int64), torch.zeros(4, 8).bfloat16(),
                        torch.zeros(4, 8).bfloat16(), 1, 1, 8, torch.zeros(1, dtype=torch.int64),
                        torch.zeros(2, 1, 4, 1, 8).bfloat16())
