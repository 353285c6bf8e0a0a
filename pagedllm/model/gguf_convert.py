"""Turn a GGUF file into a Hugging Face style model directory, once, in a cache.

The rest of pagedllm only knows Hugging Face directories (config.json,
safetensors with HF parameter names, tokenizer.json). Converting a GGUF file
into that shape once, and keeping the result, means one loading path for every
model and a fast second start: the expensive part (parsing the vocabulary,
dequantizing) happens only the first time a given file is seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pagedllm.file_cache import cache_root

logger = logging.getLogger(__name__)

# Bump when the conversion output changes, so old caches are not reused.
CONVERTER_VERSION = "1"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe")  # llama with experts: Mixtral

# Unfinished conversions older than this are from crashed runs and get removed.
_STALE_TMP_SECONDS = 3600

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Where an architecture names a tensor otherwise, or has tensors the others lack.
_GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# Gemma's four norms per layer: llama.cpp's ffn_norm is the norm before the MLP, as in Llama, but Gemma
# also normalises the outputs of attention and of the MLP.
_GEMMA_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, as in HF Phi-3
    "llama": {"ffn_gate_inp": "block_sparse_moe.gate"},  # Mixtral's router
    "qwen3moe": {"ffn_gate_inp": "mlp.gate"},
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_TENSOR = re.compile(r"^(\w+)\.(weight|bias)$")


# ---------------------------------------------------------------- cache


_EDGE_BYTES = 4 << 20  # hashed at each end of the file: the header (metadata, tensor table) and the last tensors
_SAMPLE_BYTES = 64 << 10
_NUM_SAMPLES = 16


def converted_dir(gguf_path: str) -> str:
    """The cache directory for this file's content, plus the converter version.

    Keyed by the content, not the path: the same model installed into a new
    virtualenv (a new path, a new mtime) finds its earlier conversion. The key
    hashes the size, both ends of the file and evenly spaced samples between:
    milliseconds at any size, where hashing a multi-GB file whole would add
    seconds to every start.
    """
    path = os.path.abspath(gguf_path)
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}|{CONVERTER_VERSION}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE_BYTES))
        for i in range(1, _NUM_SAMPLES + 1):
            f.seek(size * i // (_NUM_SAMPLES + 1))
            h.update(f.read(_SAMPLE_BYTES))
        f.seek(max(0, size - _EDGE_BYTES))
        h.update(f.read(_EDGE_BYTES))
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), "gguf", f"{stem}-{h.hexdigest()[:16]}")


def ensure_converted(gguf_path: str) -> str:
    """Return the converted directory for `gguf_path`, converting it first if needed.

    The conversion is written to a temporary sibling directory and renamed into
    place, so the final directory either does not exist or is complete: a crash
    mid-conversion can never leave a half cache that a later start would trust.
    """
    final = converted_dir(gguf_path)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
    except OSError as e:
        raise OSError(
            f"cannot write the converted model cache in {parent} ({e.strerror or e}); "
            f"set PAGEDLLM_CACHE_DIR to a writable directory"
        ) from e
    _remove_stale_tmp_dirs(parent, keep=tmp)
    try:
        start = time.perf_counter()
        convert_gguf(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as any download
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same conversion first; theirs is as good.
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
        logger.info("converted %s to %s in %.1f s", gguf_path, final, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp_dirs(parent: str, keep: str) -> None:
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        try:
            if name.startswith(".tmp-") and path != keep and now - os.path.getmtime(path) > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------- conversion


@dataclass
class _Gguf:
    """The parts of a parsed GGUF file that the conversion needs."""

    path: str
    reader: object  # gguf.GGUFReader
    arch: str
    stacked: tuple = (None, None)  # (name, array): the expert tensor last dequantized, sliced once per expert

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_get(self, suffix: str, default=None):
        return self.get(f"{self.arch}.{suffix}", default)

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write config, generation config, float32 safetensors and tokenizer for `gguf_path` into `out_dir`."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ValueError(f"{gguf_path} has no general.architecture in its metadata; is it a model GGUF?")
    arch = arch_field.contents()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    g = _Gguf(gguf_path, reader, arch)
    config = build_hf_config(g)
    config.save_pretrained(out_dir)
    _save_generation_config(g, out_dir)
    plans = _hf_tensors(g)
    _write_safetensors(
        os.path.join(out_dir, "model.safetensors"),
        [(p.name, p.shape) for p in plans],
        (_dequantized(g, p, config) for p in plans),
    )
    _save_tokenizer(g, out_dir, config.max_position_embeddings)


def build_hf_config(g: _Gguf):
    """A transformers config from GGUF metadata (the same numbers llama.cpp runs the model with)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    names = g.tensor_names()
    n_heads = int(g.arch_get("attention.head_count"))
    n_kv_heads = g.arch_get("attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):
        raise ValueError(f"{g.path}: per-layer head_count_kv is not supported (got a list)")
    hidden = int(g.arch_get("embedding_length"))
    head_dim = int(g.arch_get("attention.key_length", hidden // n_heads))
    rope_dim = int(g.arch_get("rope.dimension_count", head_dim))
    if rope_dim != head_dim and g.arch != "phi3":
        raise ValueError(f"{g.path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported")
    vocab = g.arch_get("vocab_size")
    if vocab is None:
        vocab = int(next(t for t in g.reader.tensors if t.name == "token_embd.weight").shape[-1])
    theta = float(g.arch_get("rope.freq_base", 10000.0))
    common = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g.arch_get("feed_forward_length")),
        num_hidden_layers=int(g.arch_get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv_heads),
        rms_norm_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(g.arch_get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        rope_parameters=_rope_parameters(g, theta, head_dim),
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=g.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )
    has_attn_bias = "blk.0.attn_q.bias" in names
    if g.arch in _GEMMA_ARCHITECTURES:
        return _gemma_hf_config(g, common, head_dim)
    if g.arch == "phi3":
        return _phi3_config(g, common, rope_dim / head_dim)
    if g.arch == "qwen3moe":
        return _qwen3moe_config(g, common, head_dim, has_attn_bias)
    if g.arch == "llama" and g.arch_get("expert_count"):
        return _mixtral_config(g, common, head_dim)
    if g.arch == "llama":
        return LlamaConfig(
            **common,
            head_dim=head_dim,
            attention_bias=has_attn_bias,
            mlp_bias="blk.0.ffn_gate.bias" in names,
            architectures=["LlamaForCausalLM"],
        )
    if g.arch == "qwen2":
        if head_dim != hidden // n_heads:
            raise ValueError(f"{g.path}: qwen2 needs head_dim == hidden_size / num_heads")
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    return Qwen3Config(**common, head_dim=head_dim, attention_bias=has_attn_bias, architectures=["Qwen3ForCausalLM"])


def _gemma_hf_config(g: _Gguf, common: dict, head_dim: int):
    """Gemma 2 / Gemma 3 with the numbers llama.cpp runs them with, where the GGUF leaves some out.

    llama.cpp keeps no query_pre_attn_scalar: it scales scores by head_dim**-0.5,
    except in the 27B models (hidden_size / num_heads); nor Gemma 3's layer
    pattern (every sixth layer global) or local rope base (10000) unless the
    file has them. Gemma 2 caps at 50 and 30 where the file is silent.
    """
    from transformers import Gemma2Config, Gemma3TextConfig

    layers, hidden, heads = common["num_hidden_layers"], common["hidden_size"], common["num_attention_heads"]
    common = dict(common)
    # llama.cpp drops the embedding's padding rows past the tokenizer's vocabulary (Gemma 3).
    embed = next(t for t in g.reader.tensors if t.name == "token_embd.weight")
    common["vocab_size"] = int(embed.shape[-1])
    largest = 46 if g.arch == "gemma2" else 62  # the 27B models' layer counts
    scalar = hidden // heads if layers == largest else head_dim
    window = g.arch_get("attention.sliding_window")
    common.update(head_dim=head_dim, query_pre_attn_scalar=scalar, hidden_activation="gelu_pytorch_tanh")
    if g.arch == "gemma2":
        return Gemma2Config(
            **common,
            sliding_window=int(window or 4096),
            attn_logit_softcapping=float(g.arch_get("attn_logit_softcapping", 50.0)) or None,
            final_logit_softcapping=float(g.arch_get("final_logit_softcapping", 30.0)) or None,
            architectures=["Gemma2ForCausalLM"],
        )
    full = common.pop("rope_parameters")
    local = {"rope_type": "default", "rope_theta": float(g.arch_get("rope.freq_base_swa", 10000.0))}
    return Gemma3TextConfig(
        **common,
        rope_parameters={"full_attention": full, "sliding_attention": local},
        sliding_window=int(window) if window else None,
        layer_types=_gemma3_layer_types(g, layers, bool(window)),
        final_logit_softcapping=float(g.arch_get("final_logit_softcapping", 0.0)) or None,
        architectures=["Gemma3ForCausalLM"],
    )


def _gemma3_layer_types(g: _Gguf, layers: int, sliding: bool) -> list[str]:
    """Which layers slide: a per-layer list or a period where the GGUF has one, else every sixth layer is global."""
    if not sliding:
        return ["full_attention"] * layers
    pattern = g.arch_get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"{g.path}: sliding_window_pattern lists {len(pattern)} layers, the model has {layers}")
        slides = [bool(p) for p in pattern]
    else:
        slides = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def _rope_parameters(g: _Gguf, theta: float, head_dim: int) -> dict:
    """HF rope parameters; llama3-style scaling is only stored as a factor tensor and is recovered from it."""
    if g.arch == "phi3":
        return _phi3_rope_parameters(g, theta, head_dim)
    scaling = g.arch_get("rope.scaling.type", "none")
    factor = g.arch_get("rope.scaling.factor")
    original = g.arch_get("rope.scaling.original_context_length")
    freqs = next((t for t in g.reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if g.arch != "llama":
            raise ValueError(f"{g.path}: rope_freqs tensor is only understood for llama, not {g.arch}")
        return _llama3_rope(np.asarray(freqs.data, dtype=np.float32), theta, head_dim, g.path)
    if scaling in ("none", None) or not factor:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
    if scaling == "yarn":
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": float(factor)}
        if original:
            params["original_max_position_embeddings"] = int(original)
        return params
    raise ValueError(f"{g.path}: unsupported rope scaling type {scaling!r}; supported: none, linear, yarn, llama3")


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, path: str) -> dict:
    """llama.cpp stores Llama 3.x rope scaling as per-frequency factors; find the HF parameters that give them.

    Every released Llama 3.1/3.2/3.3 uses low=1, high=4, original context 8192
    and only the factor varies, so try those and check the result.
    """
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    orig, low, high, factor = 8192, 1.0, 4.0, params["factor"]
    smooth = (orig / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3, atol=1e-3):
        raise ValueError(f"{path}: rope_freqs does not match llama3 rope scaling with standard parameters")
    return params


def _save_generation_config(g: _Gguf, out_dir: str) -> None:
    """End-of-turn ids are stop tokens too: a chat model ends its answer with them, not with eos."""
    from transformers import GenerationConfig

    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = g.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    if g.arch in _GEMMA_ARCHITECTURES:
        eos += [i for i in _gemma_end_of_turn_ids(g) if i not in eos]
    gen = GenerationConfig(
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=g.get("tokenizer.ggml.padding_token_id"),
    )
    gen.save_pretrained(out_dir)


def _gemma_end_of_turn_ids(g: _Gguf) -> list[int]:
    """Gemma's chat turns end with <end_of_turn>, which llama.cpp stops at by its text; Gemma's GGUFs seldom
    name it as eot_token_id."""
    tokens = g.get("tokenizer.ggml.tokens") or []
    return [i for i, t in enumerate(tokens) if t == "<end_of_turn>"]


def hf_tensor_name(gguf_name: str, arch: str | None = None) -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors HF does not keep (rope_freqs: llama3 factors,
    rope_factors_long/short: Phi-3's LongRoPE factors, which go to the config)."""
    if m := _BLOCK_TENSOR.match(gguf_name):
        layer, part, kind = m.groups()
        names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
        if part in names:
            return f"model.layers.{layer}.{names[part]}.{kind}"
    elif m := _TOP_TENSOR.match(gguf_name):
        part, kind = m.groups()
        if part in ("rope_freqs", "rope_factors_long", "rope_factors_short"):
            return None
        if part in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to pagedllm")


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for its interleaved rope.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; Hugging Face rotates
    the two halves of each head (x_i, x_{i+d/2}). The llama converter reorders
    the rows of each head from [half, i] to [i, half]; this puts them back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _TensorPlan:
    name: str  # HF name
    shape: tuple[int, ...]  # torch order
    source: object  # gguf ReaderTensor
    expert: int | None = None  # one expert's slice of a stacked expert tensor


def _hf_tensors(g: _Gguf) -> list[_TensorPlan]:
    plans = []
    for t in g.reader.tensors:
        if _EXPERT_TENSOR.match(t.name):
            plans.extend(_expert_plans(g, t))
            continue
        name = hf_tensor_name(t.name, g.arch)
        if name is not None:
            # GGUF lists dimensions fastest-moving first; torch lists them the other way round.
            plans.append(_TensorPlan(name, tuple(int(d) for d in reversed(t.shape)), t))
    return plans


def _dequantized(g: _Gguf, plan: _TensorPlan, config) -> np.ndarray:
    from gguf import quants

    t = plan.source
    if plan.expert is not None:
        return _expert_weight(g, plan)
    w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(plan.shape)
    # Only the llama converter permutes; qwen2/qwen3 use NEOX rope, the same halves layout as HF.
    if g.arch == "llama" and ".attn_q." in t.name:
        w = unpermute_rope(w, config.num_attention_heads)
    elif g.arch == "llama" and ".attn_k." in t.name:
        w = unpermute_rope(w, config.num_key_value_heads)
    elif g.arch in _GEMMA_ARCHITECTURES and t.name.endswith("norm.weight"):
        w = w - np.float32(1.0)  # llama.cpp stores Gemma's norm weights with the 1 of (1 + w) added
    return w


# ---------------------------------------------------------------- phi3, qwen3moe, mixtral (experts)

# llama.cpp stacks the experts of a layer: [E, ff, embd] for gate and up, [E, embd, ff] for down (torch order).
_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# Each expert's weight as the hub's checkpoints name it (what convert_hf_to_gguf.py stacked).
_EXPERT_NAMES = {
    "llama": {"gate": "block_sparse_moe.experts.{e}.w1", "up": "block_sparse_moe.experts.{e}.w3",
              "down": "block_sparse_moe.experts.{e}.w2"},
    "qwen3moe": {"gate": "mlp.experts.{e}.gate_proj", "up": "mlp.experts.{e}.up_proj", "down": "mlp.experts.{e}.down_proj"},
}


def _phi3_config(g: _Gguf, common: dict, partial_rotary_factor: float):
    """Phi-3 / Phi-3.5 / Phi-4-mini, as llama.cpp's Phi3MiniModel writes them: fused qkv and gate_up, the rotary
    dims as rope.dimension_count, LongRoPE factors as tensors, sliding_window 0 for none."""
    from transformers import Phi3Config

    params = dict(common.pop("rope_parameters"))
    params["partial_rotary_factor"] = partial_rotary_factor
    original = params.pop("original_max_position_embeddings", None)
    window = g.arch_get("attention.sliding_window") or None
    extra = {} if original is None else {"original_max_position_embeddings": original}
    return Phi3Config(**common, rope_parameters=params, sliding_window=window, architectures=["Phi3ForCausalLM"],
                      **extra)


def _phi3_rope_parameters(g: _Gguf, theta: float, head_dim: int) -> dict:
    tensors = {t.name: t for t in g.reader.tensors}
    long, short = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long is None:
        return {"rope_type": "default", "rope_theta": theta}
    if short is None:
        raise ValueError(f"{g.path}: rope_factors_long without rope_factors_short")
    context = int(g.arch_get("context_length"))
    original = int(g.arch_get("rope.scaling.original_context_length", context))
    params = {
        "rope_type": "longrope", "rope_theta": theta, "original_max_position_embeddings": original,
        "long_factor": [float(x) for x in np.asarray(long.data, dtype=np.float32)],
        "short_factor": [float(x) for x in np.asarray(short.data, dtype=np.float32)],
    }
    # llama.cpp writes the attention factor transformers derives from the two lengths; keep it only where it differs.
    attn = g.arch_get("rope.scaling.attn_factor")
    scale = context / original
    default = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    if attn is not None and not math.isclose(float(attn), default, rel_tol=1e-6):
        params["attention_factor"] = float(attn)
    return params


def _mixtral_config(g: _Gguf, common: dict, head_dim: int):
    """Mixtral, which llama.cpp writes as llama with experts (softmax, top k, renormalised, as llama.cpp runs it)."""
    from transformers import MixtralConfig

    return MixtralConfig(**common, num_local_experts=int(g.arch_get("expert_count")),
                         num_experts_per_tok=int(g.arch_get("expert_used_count")),
                         head_dim=head_dim, sliding_window=None, architectures=["MixtralForCausalLM"])


def _qwen3moe_config(g: _Gguf, common: dict, head_dim: int, attention_bias: bool):
    """Qwen3-MoE: every layer sparse, top-k weights renormalised (llama.cpp's qwen3moe always does)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common, num_experts=int(g.arch_get("expert_count")),
                          num_experts_per_tok=int(g.arch_get("expert_used_count")),
                          moe_intermediate_size=int(g.arch_get("expert_feed_forward_length")),
                          norm_topk_prob=bool(g.arch_get("expert_weights_norm", True)), head_dim=head_dim,
                          attention_bias=attention_bias, architectures=["Qwen3MoeForCausalLM"])


def _expert_plans(g: _Gguf, t) -> list[_TensorPlan]:
    """One plan per expert of a stacked expert tensor, under the hub's per-expert names."""
    layer, kind = _EXPERT_TENSOR.match(t.name).groups()
    names = _EXPERT_NAMES.get(g.arch)
    if names is None:
        raise ValueError(f"GGUF tensor {t.name!r}: experts in a {g.arch} model are not supported")
    num_experts, *shape = (int(d) for d in reversed(t.shape))
    pattern = f"model.layers.{layer}.{names[kind]}.weight"
    return [_TensorPlan(pattern.format(e=e), tuple(shape), t, e) for e in range(num_experts)]


def _expert_weight(g: _Gguf, plan: _TensorPlan) -> np.ndarray:
    """One expert's slice; the stacked tensor is dequantized once for all its experts (they come in a row)."""
    from gguf import quants

    t = plan.source
    if g.stacked[0] != t.name:
        full = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        g.stacked = (t.name, full.reshape(tuple(int(d) for d in reversed(t.shape))))
    return g.stacked[1][plan.expert]


def _write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...]]], arrays: Iterator[np.ndarray]) -> None:
    """Write float32 tensors one at a time, so a conversion never holds the whole model in memory.

    The safetensors layout is: 8-byte little-endian header length, a JSON header
    mapping each name to dtype, shape and [begin, end) byte offsets, then the
    raw data back to back. Shapes are known before dequantizing, so the header
    can be written first.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape), array in zip(specs, arrays, strict=True):
            assert array.shape == shape and array.dtype == np.float32, (name, array.shape, shape)
            f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())


def _save_tokenizer(g: _Gguf, out_dir: str, max_length: int) -> None:
    """Build the fast tokenizer from the GGUF vocabulary with transformers, then check what matters.

    transformers reads tokens, merges, token types, special ids and the chat
    template from the metadata; we only verify the chat template and the
    add_bos flag came through, since those silently change every prompt.
    """
    if g.get("tokenizer.ggml.model") is None:
        logger.warning("%s has no tokenizer in its metadata; the converted model has none either", g.path)
        return
    from transformers import AutoTokenizer

    directory, name = os.path.split(os.path.abspath(g.path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    template = g.get("tokenizer.chat_template")
    if template and tokenizer.chat_template != template:
        tokenizer.chat_template = template
    add_bos = g.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and getattr(tokenizer, "add_bos_token", None) not in (None, bool(add_bos)):
        raise ValueError(f"{g.path}: tokenizer add_bos_token came out wrong after conversion")
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    # Loading-time flags that transformers writes back out; they say nothing about the tokenizer.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
