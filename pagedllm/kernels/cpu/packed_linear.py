"""Linear layers whose weights are laid out once for oneDNN, on the CPU (bfloat16 and float32).

torch's bf16 matmul on the CPU hands a plain weight to oneDNN, which
re-lays it out into its blocked format on every call. At decode batch sizes
(1..64 rows) that re-layout is a large share of each projection: packing once
at load time is faster there and gives the same bits (checked by
tests/test_packed_linear.py).

torch's float32 matmul goes to MKL, which on a 2-core Ice Lake takes several
times longer than oneDNN on a packed weight from 4 to 64 rows (at 1-2 rows MKL
is a little faster, above 128 rows they are even; figures in
docs/cpu-performance.md and benchmarks/RESULTS.md). oneDNN sums in another
order than MKL, so float32 results move in the last bits; the greedy outputs
stay token-identical to transformers (tests/test_smollm2.py) and the logits
within the tolerance of tests/test_models.py.

On a CPU without bf16 matrix instructions (AVX-512 BF16 or AMX), oneDNN and
torch emulate bf16 products and run several times slower than float32. There the
weight is widened to float32 once (exactly: every bf16 value is a float32),
each input is widened, the product runs in float32 and the output is rounded
back to bf16. That is what a bf16 kernel computes (exact products, float32
sums, one rounding at the end), up to the order of the sums. Decode steps
(up to 64 rows) instead go to csrc/skinny_gemm.cpp, which reads the bf16
weight itself (half the bytes), widens it in registers and computes the same
float32 sums: faster than oneDNN's float32 there, most at the fewest rows,
where a step is bound by reading the weights (benchmarks/skinny_gemm.py).
So a widened layer holds its weight twice, packed in float32 for oneDNN and in
bf16 for the skinny kernel: three times the bf16 weight's memory.

Where the CPU has AVX-512 BF16, decode steps go to the skinny kernel's bf16
pair form instead (vdpbf16ps on the weight in its operand layout, the input
rows broadcast from memory): ahead of oneDNN's packed bf16 on decode batches,
most at the fewest rows (benchmarks/skinny_gemm.py --kernel pairs), with
each output one float32 sum, as oneDNN's. Such a layer holds its bf16 weight
twice (oneDNN's layout for prefill, pairs for decode).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.kernels.cpu import skinny_gemm
from pagedllm.kernels.cpu.cpu_info import native_bf16, onednn_bf16

_BATCH_HINT = 64  # oneDNN picks its blocking for about this many rows; other sizes run fine
_SKINNY_ROWS = 64  # widened layers multiply up to this many rows in the skinny kernel (oneDNN is ahead from ~96)
PAIR_ROWS = 64  # bf16 layers with AVX-512 BF16: up to this many rows in the pair kernel (even with oneDNN from ~128)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool | None = None) -> None:
        """upcast: compute in float32 from a widened weight (default: where the CPU has no native bf16)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.upcast = weight.dtype == torch.bfloat16 and (not native_bf16() if upcast is None else upcast)
        if weight.dtype == torch.bfloat16 and not self.upcast and not onednn_bf16():
            raise ValueError("this CPU has no bf16 matmul in oneDNN (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT): "
                             "a bf16 layer must compute in float32 here (upcast=True)")
        compute = torch.float32 if self.upcast else weight.dtype
        self.packed = _pack(weight.detach().to(compute))
        self.bias = None if bias is None else bias.detach().to(compute)
        # Decode-sized inputs of a widened layer: the bf16 weight itself, in the skinny kernel's layout.
        self.skinny = skinny_gemm.pack(weight) if self.upcast and skinny_gemm.available() else None
        # Decode-sized inputs of a native bf16 layer: the weight in vdpbf16ps's operand layout.
        native = weight.dtype == torch.bfloat16 and not self.upcast and skinny_gemm.pairs_native()
        self.pair_weight = skinny_gemm.PairWeight(weight, bias) if native else None

    @property
    def pairs(self) -> torch.Tensor | None:
        """The weight in the pair kernel's layout (a native bf16 layer), else None."""
        return None if self.pair_weight is None else self.pair_weight.packed

    def forward(self, x: torch.Tensor, round_output: bool = True) -> torch.Tensor:
        """Widened (upcast): x may come in float32 already (bf16 values), and with round_output=False the
        float32 product goes out unrounded, for a consumer that rounds it as it reads (cpu_ops.silu_and_mul)."""
        y = self._skinny(x, self.dtype if round_output or not self.upcast else torch.float32)
        if y is not None:
            return y
        if not self.upcast:
            return _linear(x, self.packed, self.bias)
        y = _linear(x if x.dtype == torch.float32 else x.float(), self.packed, self.bias)
        return y.to(self.dtype) if round_output else y

    @property
    def fuses_silu(self) -> bool:
        """Whether silu_and_mul runs decode-sized inputs in one pass: a native bf16 gate/up projection whose
        halves are whole panels of the pair kernel."""
        return self.pair_weight is not None and skinny_gemm.fuses_silu(self.out_features)

    def silu_and_mul(self, x: torch.Tensor, act) -> torch.Tensor:
        """act(self(x)) for this fused gate/up projection and its SiLU-and-mul act (cpu_ops.silu_and_mul): where
        fuses_silu and x is decode-sized, both in one pass of the pair kernel, with the same bits and without the
        [rows, 2 * inter] product in between."""
        if self.pair_weight is not None and x.shape[0] <= PAIR_ROWS and x.stride(-1) == 1:
            return self.pair_weight.silu(x)
        return act(self(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """self(x).float() (an LM head's logits, which the sampler reads in float32), in one pass where a skinny
        kernel takes x: it stores the bf16-rounded sums as float32 instead of bf16 for a conversion to widen."""
        y = self._skinny(x, torch.float32, bf16_in_float=True) if self.dtype == torch.bfloat16 else None
        return y if y is not None else self(x).float()

    def _skinny(self, x: torch.Tensor, out_dtype: torch.dtype, bf16_in_float: bool = False) -> torch.Tensor | None:
        """The product in this layer's skinny kernel where it takes x (decode-sized, rows contiguous); else None."""
        if x.stride(-1) != 1:
            return None
        if self.pair_weight is not None and x.shape[0] <= PAIR_ROWS:
            return self.pair_weight(x, out_dtype, bf16_in_float)
        if self.skinny is not None and x.shape[0] <= _SKINNY_ROWS:
            return skinny_gemm.linear(x, self.skinny, self.out_features, self.bias, out_dtype, bf16_in_float)
        return None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
