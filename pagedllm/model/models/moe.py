"""Mixture-of-experts decoders: Mixtral and Qwen3-MoE.

Llama decoders whose MLP is a sparse block: a router scores every expert for
each token, the top k run on it, and their outputs are summed with the
router's weights. Mixtral renormalises the top k weights (softmax, top k, /
sum); Qwen3-MoE does so only with norm_topk_prob, has Qwen3's q/k norms, and
may keep plain MLP layers (mlp_only_layers, decoder_sparse_step).

Experts are stacked as transformers 5 keeps them: gate and up fused
[E, 2 * I, H], down [E, H, I]. Checkpoints on disk name each expert apart
(Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2 and block_sparse_moe.gate;
Qwen3-MoE: mlp.experts.{e}.gate_proj/up_proj/down_proj); `load_weights`
takes both forms.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.models.llama import LlamaForCausalLM, LlamaMLP
from pagedllm.kernels.cpu.packed_linear import PackedLinear, can_pack
from pagedllm.model.layer_kernels import LayerKernels

# An expert's own weight in an on-disk checkpoint: layer prefix, expert, which projection.
_EXPERT_WEIGHT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_GATE_PROJ, _UP_PROJ = ("w1", "gate_proj"), ("w3", "up_proj")


class MoEExperts(nn.Module):
    """E SwiGLU experts stacked: gate_up_proj [E, 2 * I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.packed: nn.ModuleList | None = None  # per expert (gate_up, down) PackedLinears, once packed

    def pack(self) -> int:
        """Lay each expert's weights out once for oneDNN, as the dense layers are (kernels/cpu/packed_linear.py: bf16 on
        a CPU without bf16 instructions computes from widened weights); the stacks are freed. Returns how many."""
        if self.packed is not None or not can_pack(self.gate_up_proj):
            return 0
        self.packed = nn.ModuleList(
            nn.ModuleList((PackedLinear(self.gate_up_proj[e], None), PackedLinear(self.down_proj[e], None)))
            for e in range(self.num_experts))
        self.gate_up_proj = self.down_proj = None
        return 2 * self.num_experts

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; experts, weights [T, k]: each token's chosen experts and their weights.

        The (token, expert) pairs are sorted by expert, so that each expert
        with tokens runs once, on all of them: one gate/up and one down
        product, weighted, added back at its tokens. Experts go in ascending
        order, as in transformers, so each token sums its experts' outputs in
        the same order.
        """
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        pair_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            if self.packed is not None:
                gate_up_proj, down_proj = self.packed[e]
                gate, up = gate_up_proj(x[rows]).chunk(2, dim=-1)
                h = down_proj(F.silu(gate) * up)
            else:
                gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                h = F.linear(F.silu(gate) * up, self.down_proj[e])
            h = h * pair_weights[start : start + n, None]
            out.index_add_(0, rows, h.to(out.dtype))
            start += n
        return out


class SparseMoeBlock(nn.Module):
    """Router (`gate`) and experts: softmax over the router's logits in float32, top k, optionally renormalised."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 weights_in_model_dtype: bool) -> None:
        """weights_in_model_dtype: round the routing weights to the activations' dtype before use (Qwen3-MoE does;
        Mixtral keeps them in float32)."""
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and the number of experts ({num_experts}), got {top_k}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_in_model_dtype = weights_in_model_dtype
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)

    def finish_load(self, kernels: LayerKernels) -> bool:
        """The router and the experts laid out for oneDNN where the projections are (model/layer_kernels.py);
        returns False: the block takes its input in the model's dtype."""
        self.gate = kernels.linear(self.gate)
        if kernels.packed:
            self.experts.pack()
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        return self.experts(x, experts, weights)


def _first(hf: dict, *keys: str, default: int) -> int:
    """The first of `keys` that config.json sets, else transformers' default."""
    return int(next((hf[k] for k in keys if hf.get(k) is not None), default))


class _MoEForCausalLM(LlamaForCausalLM):
    """A Llama decoder whose MLPs are sparse blocks (where `_is_sparse` says so)."""

    supports_tensor_parallel = False  # not yet: tensor_parallel_size > 1 is refused for this family

    # MoEExperts reads how many tokens each expert got on the host, which a CUDA graph cannot capture.
    cuda_graph_safe = False

    def _moe_numbers(self, cfg: ArchConfig) -> tuple[int, int, int, bool, bool]:
        """num_experts, top_k, expert intermediate size, renormalise, routing weights in the model's dtype."""
        raise NotImplementedError

    def _is_sparse(self, cfg: ArchConfig, layer: int) -> bool:
        return True

    def _mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        act = cfg.hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{cfg.model_type} with hidden_act {act!r} is not supported (supported: silu)")
        if not self._is_sparse(cfg, layer):
            return LlamaMLP(cfg)
        num_experts, top_k, inter, renormalize, rounded = self._moe_numbers(cfg)
        return SparseMoeBlock(cfg.hidden_size, inter, num_experts, top_k, renormalize, rounded)

    def _weight_slot(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, torch.Tensor]:
        ours = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's on-disk name of the sparse block
        m = _EXPERT_WEIGHT.match(ours)
        if m is None:  # the router, stacked experts (transformers 5 names) and everything else
            return super()._weight_slot(ours, params)
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.down_proj" if proj in ("w2", "down_proj") else f"{prefix}.gate_up_proj"
        if target not in params or expert >= params[target].shape[0]:
            raise ValueError(f"checkpoint has a weight {name!r} that this model has no place for")
        dest = params[target][expert]
        if proj in _GATE_PROJ + _UP_PROJ:
            inter = dest.shape[0] // 2
            dest = dest.narrow(0, 0 if proj in _GATE_PROJ else inter, inter)
        return target, dest


class MixtralForCausalLM(_MoEForCausalLM):
    def _moe_numbers(self, cfg: ArchConfig) -> tuple[int, int, int, bool, bool]:
        hf = cfg.hf
        return (_first(hf, "num_local_experts", "num_experts", default=8), _first(hf, "num_experts_per_tok", default=2),
                cfg.intermediate_size, True, False)


class Qwen3MoeForCausalLM(_MoEForCausalLM):
    def _moe_numbers(self, cfg: ArchConfig) -> tuple[int, int, int, bool, bool]:
        hf = cfg.hf
        # transformers 5 writes num_local_experts (an alias); config.json files on the hub say num_experts.
        return (_first(hf, "num_experts", "num_local_experts", default=128), _first(hf, "num_experts_per_tok", default=8),
                _first(hf, "moe_intermediate_size", default=768), bool(hf.get("norm_topk_prob", False)), True)

    def _is_sparse(self, cfg: ArchConfig, layer: int) -> bool:
        hf = cfg.hf
        num_experts = self._moe_numbers(cfg)[0]
        step = _first(hf, "decoder_sparse_step", default=1)
        return layer not in (hf.get("mlp_only_layers") or []) and num_experts > 0 and (layer + 1) % step == 0
