"""Which model class builds a config's `model_type`.

Every class here is built as `cls(cfg: ArchConfig, attn_backend)` and offers
what the model runner uses: `forward(input_ids, positions, kv_caches, meta)`
(meta: one AttentionMetadata for all layers, or one per layer), `compute_logits`,
`load_weights` (Hugging Face names), `init_dummy_weights`, `build_tables`
(rope tables on the device), `pack_for_cpu`, and `num_kv_heads` / `head_dim`.
Modules are imported when their family is asked for.
"""

from __future__ import annotations

import importlib

from pagedllm.model.arch_config import ArchConfig

_MODELS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaForCausalLM"),
    "qwen2": ("llama", "LlamaForCausalLM"),
    "qwen3": ("llama", "LlamaForCausalLM"),
    "gemma2": ("gemma", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "mixtral": ("moe", "MixtralForCausalLM"),
    "qwen3_moe": ("moe", "Qwen3MoeForCausalLM"),
}


def model_class(cfg: ArchConfig) -> type:
    try:
        module, name = _MODELS[cfg.model_type]
    except KeyError:
        raise ValueError(f"model type {cfg.model_type!r} has no model class (supported: {', '.join(_MODELS)})") from None
    return getattr(importlib.import_module(f"pagedllm.model.models.{module}"), name)
