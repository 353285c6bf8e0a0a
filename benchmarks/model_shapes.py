"""Real model configurations, for dummy-weight runs of their shapes on this machine.

    python -m benchmarks.model_shapes write gemma-3-1b /tmp/shapes/gemma-3-1b [--layers N]
    python -m benchmarks.model_shapes list

Each entry is the published config.json of a model (the numbers that set
its shapes), with the layer count that fits a 2-core, 24 GiB CPU given
separately: layer counts keep each family's pattern (Gemma 2 alternates,
Gemma 3 has 5 local layers per global one). `write` saves transformers'
random initialisation and a word-level tokenizer (pagedllm.model.synthetic),
so pagedllm and transformers compute with the same weights. Phi-3.5-mini's
LongRoPE factors are placeholders of the right count: the speed does not
depend on their values.
"""

from __future__ import annotations

import argparse
import json

_PHI35_FACTORS = 48  # head_dim 96 / 2

SHAPES = {
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192, rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True),
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
        max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True),
    "phi-3.5-mini": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, sliding_window=262144, rope_theta=10000.0, rms_norm_eps=1e-5,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(_PHI35_FACTORS)],
                      "long_factor": [1.0 + 0.5 * i for i in range(_PHI35_FACTORS)]},
        tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}

# Layers that fit this machine in float32, weights and all, with the family's pattern intact.
FITS_HERE = {"mistral-7b": 2, "gemma-2-2b": 4, "gemma-3-1b": 6, "phi-3.5-mini": 4, "qwen3-30b-a3b": 1, "mixtral-8x7b": 1}


def config_dict(name: str, layers: int | None = None, **overrides) -> dict:
    d = dict(SHAPES[name], **overrides)
    if layers is not None:
        d["num_hidden_layers"] = layers
    return d


def write(name: str, path: str, layers: int | None = None, dtype: str = "float32", **overrides) -> str:
    import transformers

    from pagedllm.model.synthetic import build_model_dir

    d = config_dict(name, layers, **overrides)
    config = transformers.AutoConfig.for_model(**d)
    return build_model_dir(path, config, dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("name", choices=sorted(SHAPES))
    w.add_argument("path")
    w.add_argument("--layers", type=int, default=None, help="default: what fits here (FITS_HERE); 0: the real count")
    w.add_argument("--dtype", default="float32")
    w.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config value")
    sub.add_parser("list")
    args = ap.parse_args()
    if args.cmd == "list":
        for name, d in SHAPES.items():
            print(f"{name}: {d['model_type']}, {d['num_hidden_layers']} layers (here: {FITS_HERE[name]})")
        return
    layers = FITS_HERE[args.name] if args.layers is None else (args.layers or None)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(write(args.name, args.path, layers, args.dtype, **overrides))


if __name__ == "__main__":
    main()
