"""Building blocks of Llama-family decoders.

Each computes exactly what Hugging Face transformers computes, in the same
order and precision, because greedy outputs must stay token-identical to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.kernels.cpu import ops as cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual).

        The sum is what a decoder layer adds back later; computing it here lets the
        fused kernel (FusedRMSNorm) add and normalise in one pass.
        """
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm normalises in float32, rounds to x's dtype, then
        # scales. torch's rms_norm computes that bit for bit, but given the weight it
        # scales before rounding, which in bf16/fp16 differs in a quarter of the values.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


class FusedRMSNorm(RMSNorm):
    """An RMSNorm of the hidden stream ([T, dim], bf16 or float32 on the CPU) in one pass of the fused kernel
    (kernels/cpu/ops.py), which also writes x + residual over residual. Built from a loaded RMSNorm, whose
    weight it shares (model/layer_kernels.py chooses it)."""

    def __init__(self, norm: RMSNorm, float_out: bool = False) -> None:
        """float_out: the bf16 output values in float32, for a widened projection to read
        (kernels/cpu/packed_linear.py); x may then come in float32 too, rounded to bf16 as it is read."""
        nn.Module.__init__(self)
        self.weight = norm.weight
        self.eps = norm.eps
        self.out_dtype = torch.float32 if float_out else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out = cpu_ops.rms_norm(x, self.weight, self.eps, residual, self.out_dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_dim(head_dim: int, params: dict) -> int:
    """How many leading dims of each head rotate (partial_rotary_factor: Phi-4-mini rotates 3/4 of them)."""
    return int(head_dim * float(params.get("partial_rotary_factor") or 1.0))


def rope_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    dim = rotary_dim(head_dim, params)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise NotImplementedError(f"rope type {rope_type!r} is not supported yet (supported: default, linear, llama3, "
                              "and longrope in Phi-3)")


def _rope_tables(inv_freq: torch.Tensor, num_positions: int, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin [num_positions, 2 * len(inv_freq)] as transformers computes them (angles in float32, then scaled)."""
    t = torch.arange(num_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = t[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding over a precomputed cos/sin table indexed by position.

    With a partial_rotary_factor only the first `rotary_dim` dims of each head
    rotate; the rest pass through.
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim(head_dim, params)
        self.max_positions = max_positions
        self.params = params
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.params).to(device)
        self.cos, self.sin = _rope_tables(inv_freq, self.max_positions, dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: each token's row of the table (its position, or LongRoPE.table_rows)."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, d]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate every head of x [T, heads, d]: queries and keys side by side in one pass."""
        return _rotate(x, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


class LongRoPE(RotaryEmbedding):
    """Phi-3's LongRoPE ("su"): per-frequency factors, short ones up to original_max_position_embeddings and long
    ones past it, and cos/sin scaled by an attention factor, as transformers' _compute_longrope_parameters.

    transformers picks one set for a whole forward pass by its length (the
    largest position + 1): long when it exceeds the original length. Here the
    choice is per sequence and step: a sequence uses the long factors, for the
    queries and keys it computes in a step, when its length after that step
    exceeds the original length. That is transformers' choice whenever it
    runs a sequence in one pass, and its generate()'s whenever the prompt is
    prefilled in one chunk and the sequence does not grow past the original
    length while decoding. It differs (keys already in the cache keep the
    short factors' rotation) where a prompt longer than the original length
    is prefilled in several chunks (the scheduler chunks a prompt longer than
    max_num_batched_tokens: set that past the longest prompt to avoid it),
    where a sequence grows past the original length while decoding
    (generate() then recomputes its whole cache with the long factors), and
    where a cached prefix computed by a short sequence is reused by a long one.

    One table holds both: rows [0, original) the short factors' angles,
    rows [original, original + max_positions) the long ones'; `table_rows`
    gives each token its row.
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__(head_dim, max_positions, params)
        self.original = int(params["original_max_position_embeddings"])
        half = self.rotary_dim // 2
        for key in ("short_factor", "long_factor"):
            if len(params[key]) != half:
                raise ValueError(f"rope {key} has {len(params[key])} values, expected {half} (rotary dims / 2)")
        factor = params.get("factor") or max_positions / self.original
        scale = params.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original))
        self.attention_factor = float(scale)

    def _inv_freq(self, factors: list, device: torch.device) -> torch.Tensor:
        dim, base = self.rotary_dim, float(self.params["rope_theta"])
        shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base**shape)

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        short = _rope_tables(self._inv_freq(self.params["short_factor"], device), self.original, dtype, self.attention_factor)
        long = _rope_tables(self._inv_freq(self.params["long_factor"], device), self.max_positions, dtype,
                            self.attention_factor)
        self.cos = torch.cat((short[0], long[0]))
        self.sin = torch.cat((short[1], long[1]))

    def table_rows(self, positions: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                   max_seq_len: int) -> torch.Tensor:
        """Each token's row: its position, shifted into the long table where its sequence (seq_lens: its length
        once this step's tokens are in) is longer than the original length. Reads no device value on the host."""
        if max_seq_len <= self.original:
            return positions
        tokens = torch.arange(positions.shape[0], device=positions.device, dtype=query_start_loc.dtype)
        seq = torch.searchsorted(query_start_loc[1:], tokens, right=True).clamp_(max=seq_lens.shape[0] - 1)
        return positions + (seq_lens > self.original)[seq].to(positions.dtype) * self.original


def rotary_embedding(head_dim: int, max_positions: int, params: dict) -> RotaryEmbedding:
    """The rotary embedding a config's rope parameters ask for."""
    cls = LongRoPE if params.get("rope_type") == "longrope" else RotaryEmbedding
    return cls(head_dim, max_positions, params)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = cos.shape[-1]
    if d < x.shape[-1]:  # partial rotary: the tail of each head passes through
        return torch.cat((_rotate(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    half = d // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
