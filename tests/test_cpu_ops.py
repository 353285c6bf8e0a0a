"""The fused CPU kernels must round where torch's ops round: same bits, or (the norm's sum) within one bf16 step;
in float32, within a few float32 steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.kernels.cpu import ops as cpu_ops
from pagedllm.model.layers import RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu_ops.available(torch.empty(1, dtype=torch.bfloat16)), reason="CPU kernels did not build")


def hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm in bf16."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 48, 300])
@pytest.mark.parametrize("dim", [72, 576])
def test_rms_norm_with_and_without_residual(rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).bfloat16()
    res = torch.randn(rows, dim, generator=g).bfloat16()
    w = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    # The sum of squares runs in another order than torch's (whose order depends on the CPU's vector width):
    # the normalised row may move by one bf16 step, and its product with the weight, rounded again, by one more.
    one_step = dict(atol=0, rtol=2**-6)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5), **one_step)
    total = x + res
    residual = res.clone()
    out = cpu_ops.rms_norm(x, w, 1e-5, residual)
    assert torch.equal(residual, total)  # the stream the next layer adds to, written in place
    torch.testing.assert_close(out, hf_rms_norm(total, w, 1e-5), **one_step)
    assert (out != hf_rms_norm(total, w, 1e-5)).float().mean() < 1e-3


def test_rms_norm_reads_a_strided_input():
    x = torch.randn(5, 128).bfloat16()
    w = torch.rand(64).bfloat16()
    torch.testing.assert_close(cpu_ops.rms_norm(x[:, :64], w, 1e-6), hf_rms_norm(x[:, :64], w, 1e-6), atol=0, rtol=2**-7)


@pytest.mark.parametrize("rows,dim", [(1, 576), (48, 576), (300, 72), (3, 20)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_widened_rms_norm_gives_the_bf16_norm_of_the_rounded_input(rows, dim, with_residual):
    """Between widened projections: x comes in float32 unrounded, out goes in float32; the bf16 norm's values, bit for bit."""
    g = torch.Generator().manual_seed(rows + dim)
    x32 = torch.randn(rows, dim, generator=g) * 3  # a float32 product, not yet rounded to bf16
    res = torch.randn(rows, dim, generator=g).bfloat16() if with_residual else None
    w = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    res_ref = None if res is None else res.clone()
    ref = cpu_ops.rms_norm(x32.bfloat16(), w, 1e-5, res_ref)
    for x_in, out_dtype in [(x32, torch.float32), (x32, None), (x32.bfloat16(), torch.float32)]:
        residual = None if res is None else res.clone()
        out = cpu_ops.rms_norm(x_in, w, 1e-5, residual, out_dtype)
        assert out.dtype == (out_dtype or torch.bfloat16)
        assert torch.equal(out.bfloat16(), ref) and torch.equal(out.bfloat16().float(), out.float())
        if res is not None:
            assert torch.equal(residual, res_ref)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (48, 1536), (300, 100), (3, 7)])
def test_silu_and_mul_is_bit_identical_to_torch(rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).bfloat16()
    # Values where exp overflows or underflows, zeros, and infinities.
    x[0, : min(inter, 8)] = torch.tensor([-100.0, 100.0, -88.5, 88.5, 0.0, -0.0, float("inf"), float("-inf")])[: min(inter, 8)]
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), F.silu(gate) * up, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("rows", [1, 7, 48, 300])
def test_float32_rms_norm_with_and_without_residual(rows):
    g = torch.Generator().manual_seed(rows)
    x, res = torch.randn(rows, 576, generator=g) * 3, torch.randn(rows, 576, generator=g)
    w = torch.rand(576, generator=g) + 0.5
    tight = dict(atol=1e-6, rtol=1e-6)  # the order of the sum of squares
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5), **tight)
    residual = res.clone()
    out = cpu_ops.rms_norm(x, w, 1e-5, residual)
    assert torch.equal(residual, x + res)
    torch.testing.assert_close(out, hf_rms_norm(x + res, w, 1e-5), **tight)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (48, 1536), (3, 7)])
def test_float32_silu_and_mul(rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, generator=g) * 4
    x[0, : min(inter, 4)] = torch.tensor([-100.0, 100.0, 0.0, -0.0])[: min(inter, 4)]
    gate, up = x.chunk(2, dim=-1)
    # Both exps are approximations (torch's Sleef differs per vector width): two float32 steps apart at most.
    torch.testing.assert_close(cpu_ops.silu_and_mul(x), F.silu(gate) * up, atol=1e-7, rtol=2.5e-7)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (48, 1536), (3, 7)])
def test_silu_and_mul_of_bf16_values_carried_in_float32_rounds_as_bf16(rows, inter):
    """A widened bf16 projection's unrounded float32 output gives the bf16 kernel's result on its rounding."""
    g = torch.Generator().manual_seed(rows * inter)
    x = torch.randn(rows, 2 * inter, generator=g) * 4
    out = cpu_ops.silu_and_mul(x, bf16_in_float=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, cpu_ops.silu_and_mul(x.bfloat16()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rope_and_store_equals_rotary_then_index_copy(tokens, dtype):
    heads, kv_heads, d, block_size = 9, 3, 64, 16
    rot = RotaryEmbedding(d, 4096, {"rope_type": "default", "rope_theta": 100000.0})
    rot.build(torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    num_blocks = tokens // block_size + 4
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[0] = -1  # a padding row stores nothing
    cache = torch.full((2, num_blocks, block_size, kv_heads, d), float("nan"), dtype=dtype)
    expected = rot.rotate(positions, qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d)).reshape(tokens, -1)
    values = qkv[:, (heads + kv_heads) * d :].clone()
    cpu_ops.rope_and_store(qkv, positions, rot.cos, rot.sin, heads, kv_heads, d, slots, cache)
    assert torch.equal(qkv[:, : (heads + kv_heads) * d], expected)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], values)
    k_slots, v_slots = cache[0].view(-1, kv_heads, d), cache[1].view(-1, kv_heads, d)
    stored = slots >= 0
    assert torch.equal(k_slots[slots[stored]], expected[stored, heads * d :].view(-1, kv_heads, d))
    assert torch.equal(v_slots[slots[stored]], values[stored].view(-1, kv_heads, d))
    assert int((~torch.isnan(k_slots)).all(-1).all(-1).sum()) == int(stored.sum())  # nothing else was written


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (48, 49152), (3, 37), (2, 16), (1, 1)])
def test_argmax_equals_torch_including_ties_nan_and_inf(rows, vocab):
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g)
    assert torch.equal(cpu_ops.argmax(x), x.argmax(-1))
    if vocab >= 37:
        x[0, 5] = x[0, vocab - 3] = 1e4  # a tie: the first one wins
        x[-1, :] = float("-inf")
        assert torch.equal(cpu_ops.argmax(x), x.argmax(-1))
        x[0, vocab - 1] = float("nan")  # NaN wins, as in torch
        x[0, vocab // 2] = float("nan")
        assert torch.equal(cpu_ops.argmax(x), x.argmax(-1))
    wide = torch.randn(rows, vocab + 5, generator=g)
    assert torch.equal(cpu_ops.argmax(wide[:, :vocab]), wide[:, :vocab].argmax(-1))  # rows with a stride
