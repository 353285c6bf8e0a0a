"""Gemma 2 and Gemma 3 (text) decoders.

They differ from Llama where greedy outputs would notice: the embedding is
scaled by sqrt(hidden_size) rounded to the model's dtype; every norm scales by
(1 + weight) in float32 and rounds once; each layer normalises the outputs of
attention and of the MLP too (four norms) before adding them to the residual
stream; the MLP is GeGLU; scores are scaled by query_pre_attn_scalar**-0.5.
Sliding-window and global layers alternate (cfg.layer_windows). Gemma 2
soft-caps attention scores and the final logits; Gemma 3 normalises each head
of q and k and gives its sliding and global layers rope tables of their own.
Weights load through Llama's loader (same Hugging Face names, same fusions).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.attention.metadata import AttentionMetadata, per_layer
from pagedllm.model.attention.torch_backend import TorchPagedAttention
from pagedllm.model.layers import RotaryEmbedding
from pagedllm.model.models.llama import LlamaAttention, LlamaForCausalLM
from pagedllm.kernels.cpu.packed_linear import PackedLinear
from pagedllm.model.layer_kernels import LayerKernels

# hidden_activation -> the `approximate` argument of F.gelu (transformers' ACT2FN names)
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


class GemmaRMSNorm(nn.Module):
    """transformers' Gemma norm: the weight is stored centred on 0 and applied as (1 + w) before rounding."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig, approximate: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.approximate = approximate

    def finish_load(self, kernels: LayerKernels) -> None:
        self.gate_up_proj = kernels.linear(self.gate_up_proj)
        self.down_proj = kernels.linear(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class GemmaAttention(LlamaAttention):
    """Llama's projections with Gemma's q/k norms, score scale and soft cap; rope per layer kind, in torch."""

    norm_class = GemmaRMSNorm

    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding, attn_backend: type, scale: float,
                 sliding_window: int | None, soft_cap: float | None, qk_norm: bool) -> None:
        super().__init__(cfg, rotary, attn_backend, sliding_window, scale=scale, soft_cap=soft_cap, qk_norm=qk_norm)

    def finish_load(self, kernels: LayerKernels) -> bool:
        """The projections only (packed where they run): rope and the norms stay in torch."""
        self.qkv_proj = kernels.linear(self.qkv_proj)
        self.o_proj = kernels.linear(self.o_proj)
        return False

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn.forward(q, k, v.contiguous(), kv_cache, meta))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, attention: GemmaAttention, approximate: str) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = attention
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = GemmaMLP(cfg, approximate)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def finish_load(self, kernels: LayerKernels) -> None:
        self.self_attn.finish_load(kernels)
        self.mlp.finish_load(kernels)

    def forward(self, positions, x, kv_cache, meta) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class _GemmaForCausalLM(nn.Module):
    """What both families share; the subclasses say which rope a layer gets and whether q/k are normalised."""

    qk_norm = False
    attn_soft_cap_applies = True  # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it
    default_caps = (None, None)  # (attention, final) where config.json leaves them out, as the config class defaults

    def __init__(self, cfg: ArchConfig, attn_backend: type = TorchPagedAttention) -> None:
        super().__init__()
        hf = cfg.hf
        if hf.get("use_bidirectional_attention"):
            raise ValueError("Gemma models with use_bidirectional_attention (embedding models) are not supported")
        # Only hidden_activation counts: transformers ignores the hidden_act that older Gemma configs also carry.
        activation = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if activation not in _GELU:
            raise ValueError(f"hidden_activation {activation!r} is not supported (supported: {', '.join(_GELU)})")
        self.config = cfg
        self.head_dim = cfg.head_dim
        self.num_kv_heads = cfg.num_key_value_heads
        scale = float(hf.get("query_pre_attn_scalar") or 256) ** -0.5
        soft_cap = hf.get("attn_logit_softcapping", self.default_caps[0]) if self.attn_soft_cap_applies else None
        self.final_soft_cap = hf.get("final_logit_softcapping", self.default_caps[1]) or None
        windows = cfg.layer_windows or (None,) * cfg.num_hidden_layers
        self.rotaries = nn.ModuleDict(
            {kind: RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, params)
             for kind, params in self.rope_parameters(cfg).items()})
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, GemmaAttention(cfg, self.rotary_for(w), attn_backend, scale, w, soft_cap, self.qk_norm),
                              _GELU[activation])
            for w in windows)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Every Gemma checkpoint ties its head to the embedding; config.json often leaves the key out.
        self.tie_word_embeddings = bool(hf.get("tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_lm_head: PackedLinear | None = None
        self.embed_scale: torch.Tensor | None = None

    def rope_parameters(self, cfg: ArchConfig) -> dict[str, dict]:
        return {"all": cfg.rope_parameters}

    def rotary_for(self, window: int | None) -> RotaryEmbedding:
        return self.rotaries["all"]

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta) -> torch.Tensor:
        """meta: one AttentionMetadata, or one per layer (sliding and global layers in different KV cache groups)."""
        x = self.embed_tokens(input_ids) * self.embed_scale
        for layer, kv_cache, m in zip(self.layers, kv_caches, per_layer(meta, len(self.layers))):
            x = layer(positions, x, kv_cache, m)
        return self.norm(x)

    def build_tables(self, device: torch.device, dtype: torch.dtype) -> None:
        """Rope tables, and sqrt(hidden_size) as a tensor of the model's dtype: transformers multiplies by the
        rounded scale (55.5 for 55.43 in bf16), which a Python float would not be."""
        for rotary in self.rotaries.values():
            rotary.build(device, dtype)
        self.embed_scale = torch.tensor(self.config.hidden_size**0.5, dtype=dtype, device=device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = self.final_soft_cap
        if self.packed_lm_head is not None:
            if cap is None:
                return self.packed_lm_head.logits(hidden)
            logits = self.packed_lm_head(hidden)
        else:
            weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
            logits = F.linear(hidden, weight)
        if cap is not None:  # in the model's dtype, as transformers caps them
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # The last step of loading, as Llama's: the projections laid out once for oneDNN where they run
    # (model/layer_kernels.py); the element-wise steps stay in torch (the fused CPU norms compute Llama's
    # rounding, not Gemma's (1 + w)), the final norm included.
    fused_final_norm = False
    pack_for_cpu = LlamaForCausalLM.pack_for_cpu

    # --- weights ----------------------------------------------------------
    _fused_slices = LlamaForCausalLM._fused_slices
    _weight_slot = LlamaForCausalLM._weight_slot
    weight_shard = LlamaForCausalLM.weight_shard  # None: Gemma has no tensor parallelism yet (it has no `tp`)
    _skipped_weight = LlamaForCausalLM._skipped_weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        LlamaForCausalLM.load_weights(self, _text_weights(weights))

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random projections; norm weights 0, which Gemma's (1 + w) makes a scale of one."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))


def _text_weights(weights: Iterable[tuple[str, torch.Tensor]]):
    """The text decoder's weights under Gemma3ForCausalLM's names, from a multimodal Gemma 3 checkpoint too
    (whose config ArchConfig reduces to its text part): the vision tower and projector are dropped."""
    for name, tensor in weights:
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
            continue
        for prefix in ("language_model.model.", "model.language_model."):
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
                break
        else:
            if name.startswith("language_model."):  # language_model.lm_head.weight
                name = name[len("language_model.") :]
        yield name, tensor


class Gemma2ForCausalLM(_GemmaForCausalLM):
    default_caps = (50.0, 30.0)


class Gemma3ForCausalLM(_GemmaForCausalLM):
    qk_norm = True
    attn_soft_cap_applies = False

    def rope_parameters(self, cfg: ArchConfig) -> dict[str, dict]:
        return gemma3_rope_parameters(cfg.hf)

    def rotary_for(self, window: int | None) -> RotaryEmbedding:
        return self.rotaries["sliding_attention" if window is not None else "full_attention"]


def gemma3_rope_parameters(hf: dict) -> dict[str, dict]:
    """Rope of the sliding and of the global layers: transformers 5's per-layer-type rope_parameters, or the
    older rope_theta (global, with rope_scaling) and rope_local_base_freq (sliding)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(params), {}
        for key, value in (hf.get("rope_scaling") or {}).items():
            full.setdefault(key, value)
    full.setdefault("rope_theta", hf.get("rope_theta") or 1_000_000.0)
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 10_000.0)
    for p in (full, local):
        p.setdefault("rope_type", p.get("type", "default"))
    return {"sliding_attention": local, "full_attention": full}
