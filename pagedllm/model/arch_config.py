"""The numbers a decoder is built from, read straight from config.json.

transformers 5 imports a large part of itself (torch.distributed among it) the
first time a model's config class is used, which alone took about half of
the start. The model needs fifteen numbers, so they are read here, with the
defaults transformers uses for each model type when config.json leaves one out.
A transformers config object converts too (`from_hf`), which is how tests
build the same model on both sides. The numbers every family shares are
fields here; a family's own (soft-capping, experts, LongRoPE factors) are read
by its model class from `hf`, the whole config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# Per type, what transformers' config classes default to when config.json is silent.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, sliding_window=None),
    "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=None),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=None),
    "gemma2": dict(max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=4096),
    "gemma3_text": dict(max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=4096),
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None),
    "mixtral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, sliding_window=None),
    "qwen3_moe": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=None),
}
SUPPORTED_MODEL_TYPES = tuple(_DEFAULTS)
# Gemma3TextConfig's defaults for numbers the released multimodal Gemma 3 configs (gemma-3-4b) leave out of text_config.
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict = field(hash=False)  # rope_theta, rope_type and the scaling's own keys
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    sliding_window: int | None = None  # the window of the layers that slide (see layer_windows)
    eos_token_id: int | list[int] | None = None
    # Per layer: how many most recent tokens (itself included) a query attends to, None for all of them.
    layer_windows: tuple = ()
    hf: dict = field(default_factory=dict, hash=False, compare=False, repr=False)  # the whole config.json

    @property
    def is_moe(self) -> bool:
        return self.model_type in ("mixtral", "qwen3_moe")

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):
            # A Gemma 3 checkpoint with its vision tower: the text decoder is what runs here.
            d = {"model_type": "gemma3_text", **_GEMMA3_TEXT_DEFAULTS,
                 **{k: v for k, v in d["text_config"].items() if k != "model_type"}}
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"config.json of this {model_type} model lacks {', '.join(missing)}")
        defaults = _DEFAULTS[model_type]
        heads = d["num_attention_heads"]
        attention_bias = bool(d.get("attention_bias") or False)
        window = d.get("sliding_window", defaults["sliding_window"])
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
            window = None
        layer_windows = _layer_windows(model_type, d, window)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps") or defaults["rms_norm_eps"],
            max_position_embeddings=d.get("max_position_embeddings") or defaults["max_position_embeddings"],
            rope_parameters=_rope_parameters(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o_proj bias; the others follow attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(d.get("mlp_bias") or False),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=window if any(w is not None for w in layer_windows) else None,
            eos_token_id=d.get("eos_token_id"),
            layer_windows=layer_windows,
            hf=dict(d),
        )

    @classmethod
    def from_json(cls, path: str) -> "ArchConfig":
        """From a model directory or its config.json."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_hf(cls, hf_config) -> "ArchConfig":
        """From a transformers config object (tests build models on both sides from one)."""
        d = hf_config.to_dict()
        d.setdefault("tie_word_embeddings", getattr(hf_config, "tie_word_embeddings", False))
        return cls.from_dict(d)

    @classmethod
    def of(cls, config) -> "ArchConfig":
        return config if isinstance(config, ArchConfig) else cls.from_hf(config)


def _layer_windows(model_type: str, d: dict, window: int | None) -> tuple:
    """Each layer's window: from transformers 5's layer_types where config.json has them, else each family's rule."""
    n = d["num_hidden_layers"]
    if not window:
        return (None,) * n
    kinds = d.get("layer_types")
    if not kinds:
        if model_type == "gemma2":
            kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        elif model_type == "gemma3_text":
            pattern = d.get("sliding_window_pattern") or 6
            kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
            first = d.get("max_window_layers") or 0
            kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        else:
            kinds = ["sliding_attention"] * n
    if len(kinds) != n:
        raise ValueError(f"config.json lists {len(kinds)} layer_types for {n} layers")
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported (supported: sliding_attention, full_attention)")
    return tuple(int(window) if k == "sliding_attention" else None for k in kinds)


def _rope_parameters(d: dict) -> dict:
    """Rope theta and scaling, from transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = dict(d.get("rope_parameters") or {})
    for key, value in (d.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    if "rope_theta" not in params:
        params["rope_theta"] = d.get("rope_theta") or 10000.0
    params.setdefault("rope_type", params.get("type", "default"))
    return params
