"""Which implementation each layer of a model runs on, chosen once, as the last step of loading it.

The model is built on the meta device and learns its device and dtype only
when its weights arrive, so the choice is made then (`LayerKernels.choose`),
once for the whole model, and each layer's own `finish_load` takes from it
what it runs on: its projections (nn.Linear, or a PackedLinear on weights laid
out for oneDNN), its norms (torch's ops, or the fused CPU kernel), its
SiLU-and-mul, its rotary embedding and KV store. Nothing is switched later:
a layer's forward calls what it was given.

On a CPU without bf16 matrix instructions, bf16 projections compute in
float32 (kernels/cpu/packed_linear.py: "widened"). With the fused kernels,
the activations between two widened projections then stay in float32 and are
rounded where bf16 code rounds by the kernel that reads them (SiLU-and-mul,
the next norm), instead of being converted on every side.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pagedllm.kernels.cpu import ops as cpu_ops
from pagedllm.kernels.cpu.cpu_info import native_bf16
from pagedllm.kernels.cpu.packed_linear import PackedLinear, can_pack
from pagedllm.model.layers import FusedRMSNorm, RMSNorm, silu_and_mul

_fused_allowed = True


@contextmanager
def fused_ops(enabled: bool):
    """Models whose loading finishes inside use the fused CPU kernels where they run (the default), or torch's
    element-wise ops (enabled=False: what the tests compare the kernels with, and how CUDA runs)."""
    global _fused_allowed
    before, _fused_allowed = _fused_allowed, enabled
    try:
        yield
    finally:
        _fused_allowed = before


@dataclass(frozen=True)
class LayerKernels:
    packed: bool  # projections on weights laid out once for oneDNN (PackedLinear): bf16 or float32 on the CPU
    fused: bool  # norms, SiLU-and-mul, rotary + KV store in the fused CPU kernels (kernels/cpu/ops.py)
    widened: bool  # packed bf16 projections that compute in float32 (no bf16 matrix instructions here)

    @classmethod
    def choose(cls, weight: torch.Tensor) -> LayerKernels:
        """What runs here for a model whose projections are like `weight` (its device and dtype)."""
        packed = can_pack(weight)
        fused = _fused_allowed and cpu_ops.supports(weight.dtype) and cpu_ops.available(weight)
        return cls(packed, fused, packed and weight.dtype == torch.bfloat16 and not native_bf16())

    @property
    def float_activations(self) -> bool:
        """Widened projections hand their float32 products on unrounded, to fused kernels that round them."""
        return self.fused and self.widened

    def linear(self, layer: nn.Module) -> nn.Module:
        """The projection to run: a PackedLinear of an nn.Linear's weight where packed, else the layer itself."""
        if not (self.packed and isinstance(layer, nn.Linear)):
            return layer
        return PackedLinear(layer.weight, layer.bias)

    def call(self, layer: nn.Module, float_out: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """How a block calls its projection `layer` (from linear()): as it is, or, with float_out where the
        activations stay in float32 (float_activations), with the widened float32 product left unrounded."""
        if float_out and self.float_activations and isinstance(layer, PackedLinear):
            return partial(layer.forward, round_output=False)
        # A PackedLinear has no hooks: its forward, without nn.Module's call machinery around it.
        return layer.forward if isinstance(layer, PackedLinear) else layer.__call__

    def norm(self, norm: RMSNorm, float_out: bool = False) -> RMSNorm:
        """The norm to run on the hidden stream ([T, dim]): the fused kernel where it runs, else the norm itself.
        float_out: its bf16 values handed over in float32, to a widened projection (float_activations only)."""
        if not self.fused:
            return norm
        return FusedRMSNorm(norm, float_out=float_out and self.float_activations)

    def silu_and_mul(self, float_in: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """SiLU-and-mul over [T, 2 * inter]; float_in: its input is a widened projection's unrounded product
        (float_activations only), rounded as bf16 code rounds it, and its output bf16 values in float32."""
        if not self.fused:
            return silu_and_mul
        if float_in and self.float_activations:
            return lambda x: cpu_ops.silu_and_mul(x, bf16_in_float=True)
        return cpu_ops.silu_and_mul

    def gate_up_act(self, gate_up: nn.Module, project: Callable, act: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> act(project(x)) for a fused gate/up projection (from linear(), called as `project`) and its
        SiLU-and-mul `act` (from silu_and_mul()): both in one pass of the pair kernel for decode-sized x where the
        fused kernels run on a native bf16 projection (PackedLinear.fuses_silu)."""
        if self.fused and isinstance(gate_up, PackedLinear) and gate_up.fuses_silu:
            return partial(gate_up.silu_and_mul, act=act)
        return lambda x: act(project(x))

    def norm_in_product(self, layer: nn.Module, silu: bool) -> bool:
        """Whether the projection `layer` (from linear()) can compute the fused norm in front of it as it packs its
        decode-sized input (and, with silu, also SiLU-and-mul as it stores): a native bf16 PackedLinear."""
        if not (self.fused and isinstance(layer, PackedLinear) and layer.pair_weight is not None):
            return False
        return layer.fuses_silu if silu else True

    def fused_rope(self, head_dim: int, rotary_dim: int, qk_norm: bool) -> bool:
        """Whether rotary + KV store run in one fused kernel: where the whole head rotates and no q/k norm
        comes between the projection and the rotation."""
        return self.fused and not qk_norm and rotary_dim == head_dim
