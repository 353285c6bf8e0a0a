"""Phi-3 (partial rotary, LongRoPE, sliding window) and mixtures of experts (Mixtral, Qwen3-MoE): tiny random-weight
models whose logits equal transformers' in float32, through prefill chunks and decodes over scattered blocks; their
checkpoints in every naming transformers and the hub use; greedy generation token for token; GGUF conversion."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from test_models import hf_model, paged_logits

from pagedllm.worker.model_runner import ModelRunner

COMMON = dict(
    vocab_size=211, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)
PHI3_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's defaults lie outside a tiny vocabulary


def longrope(half: int, original: int, **extra) -> dict:
    """LongRoPE parameters with distinct short and long factors (`half`: rotary dims / 2)."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.15 * i for i in range(half)],
            "long_factor": [1.0 + 0.9 * i for i in range(half)], **extra}


CONFIGS = {
    # Phi-3-mini shape (full rotary, default rope), with GQA.
    "phi3": lambda: transformers.Phi3Config(**COMMON, **PHI3_IDS, num_attention_heads=6, num_key_value_heads=2),
    # Phi-3-mini-128k / Phi-3.5-mini shape: LongRoPE; every sequence here fits the original length (short factors,
    # cos/sin scaled by the attention factor sqrt(1 + ln 4 / ln 64)).
    "phi3_longrope": lambda: transformers.Phi3Config(
        **COMMON, **PHI3_IDS, num_attention_heads=6, num_key_value_heads=2, original_max_position_embeddings=64,
        rope_parameters=longrope(6, 64)),
    # Phi-4-mini shape: 3/4 of each head rotates, LongRoPE, tied embeddings.
    "phi3_partial": lambda: transformers.Phi3Config(
        **COMMON, **PHI3_IDS, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
        original_max_position_embeddings=64, rope_parameters=longrope(3, 64, partial_rotary_factor=0.75)),
    # Phi-3-mini-4k's sliding window, shorter than most sequences here.
    "phi3_window": lambda: transformers.Phi3Config(**COMMON, **PHI3_IDS, num_attention_heads=6, num_key_value_heads=2,
                                                   sliding_window=8),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2,
                                                  num_local_experts=6, num_experts_per_tok=2),
    "mixtral_window": lambda: transformers.MixtralConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2,
                                                         num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    # Qwen3-MoE as released: top-k weights not renormalised.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=40, norm_topk_prob=False),
    # Renormalised, and plain MLP layers between sparse ones (layer 0 by mlp_only_layers, 1 and 3 by the step).
    "qwen3_moe_dense": lambda: transformers.Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 4}, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=5,
        num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[0],
        decoder_sparse_step=2, attention_bias=True),
}


def _prompts(cfg, lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _runner(cfg, weights, block_size=16, dtype=torch.float32):
    return ModelRunner(cfg, weights, device=torch.device("cpu"), dtype=dtype, block_size=block_size)


def _reference(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("block_size", [1, 16])
def test_logits_match_transformers(arch, block_size):
    cfg = CONFIGS[arch]()
    model = hf_model(cfg)
    prompts = _prompts(cfg, [23, 7, 41, 2])
    ours = paged_logits(_runner(cfg, model.state_dict().items(), block_size), prompts, block_size)
    for p, o in zip(prompts, ours):
        torch.testing.assert_close(o, _reference(model, p), atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- LongRoPE: short and long factors


def logits_in_steps(runner: ModelRunner, prompts: list[list[int]], plans: list[list[int]], block_size: int):
    """test_models.paged_logits with each sequence's steps given: plans[i] lists how many tokens each step adds."""
    return paged_logits(runner, prompts, block_size, plans)


def sharp_attention(model, scale: float = 4.0):
    """Larger queries and keys: attention scores that depend on the rotation (random 0.02 weights attend uniformly)."""
    cfg = model.config
    qk_rows = (cfg.num_attention_heads + cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:qk_rows] *= scale
    return model


@pytest.mark.parametrize("arch", ["phi3_longrope", "phi3_partial"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_longrope_short_and_long_sequences_match_transformers(arch, block_size):
    """A prompt prefilled in one chunk and then decoded, batched with others: transformers' one pass over the whole
    sequence uses the long factors everywhere when it is longer than original_max_position_embeddings (64), the
    short ones when it fits; so do we, per sequence, each step choosing by the sequence's length after the step."""
    cfg = CONFIGS[arch]()
    model = sharp_attention(hf_model(cfg))
    long_prompt, short_prompt, crossing_chunked = 90, 30, 100
    prompts = _prompts(cfg, [long_prompt + 12, short_prompt + 20, 5, crossing_chunked])
    plans = [[long_prompt] + [1] * 12, [short_prompt] + [1] * 20, [5], [40, 30, 30]]
    ours = logits_in_steps(_runner(cfg, model.state_dict().items(), block_size), prompts, plans, block_size)
    for p, o in zip(prompts[:3], ours[:3]):
        torch.testing.assert_close(o, _reference(model, p), atol=2e-4, rtol=1e-4)
    # The documented difference: a long prompt prefilled in chunks keeps the short factors' keys of its first chunk.
    ref = _reference(model, prompts[3])
    torch.testing.assert_close(ours[3][:40], model(torch.tensor([prompts[3][:40]])).logits[0], atol=2e-4, rtol=1e-4)
    assert (ours[3][70:] - ref[70:]).abs().max() > 10 * 2e-4


def test_longrope_tables():
    """Short table for the original length, long table for every position, both scaled by the attention factor."""
    from pagedllm.model.layers import LongRoPE

    cfg = CONFIGS["phi3_longrope"]()
    rope = _runner(cfg, None).model.rotary
    assert isinstance(rope, LongRoPE) and rope.original == 64
    assert rope.cos.shape == (64 + 256, 12)
    hf_rope = hf_model(cfg).model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    for positions, offset in ((torch.arange(64), 0), (torch.arange(256), 64)):
        with torch.no_grad():  # transformers switches to the long factors for a pass longer than 64
            cos, sin = hf_rope(x, positions[None])
        torch.testing.assert_close(rope.cos[offset + positions], cos[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rope.sin[offset + positions], sin[0], atol=1e-6, rtol=1e-6)
    assert rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item() / torch.log(torch.tensor(64.0)).item()) ** 0.5)


def test_phi3_rope_from_config_json_as_the_hub_writes_it():
    """Phi-4-mini's config.json keeps partial_rotary_factor and original_max_position_embeddings at the top and
    older Phi-3 ones call LongRoPE "su": the tables equal transformers' for both factor sets."""
    from pagedllm.model.arch_config import ArchConfig
    from pagedllm.model.layers import LongRoPE
    from pagedllm.model.models.phi3 import phi3_rope_parameters

    d = {"model_type": "phi3", "vocab_size": 100, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512, "rope_theta": 10000.0,
         "partial_rotary_factor": 0.75, "original_max_position_embeddings": 128, "pad_token_id": 0,
         "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.02 * i for i in range(48)],
                          "long_factor": [1.0 + 0.5 * i for i in range(48)]}}
    params = phi3_rope_parameters(ArchConfig.from_dict(d))
    assert params["rope_type"] == "longrope" and params["partial_rotary_factor"] == 0.75
    rope = LongRoPE(128, 512, params)
    rope.build(torch.device("cpu"), torch.float32)
    assert rope.rotary_dim == 96 and rope.cos.shape == (128 + 512, 96)
    d["rope_scaling"] = {**d["rope_scaling"], "type": "longrope"}  # transformers 5.24 refuses "su" at validation
    hf_rope = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(transformers.Phi3Config(**d))
    x = torch.zeros(1)
    for positions, offset in ((torch.arange(128), 0), (torch.arange(512), 128)):
        with torch.no_grad():
            cos, sin = hf_rope(x, positions[None])
        torch.testing.assert_close(rope.cos[offset + positions], cos[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rope.sin[offset + positions], sin[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- checkpoints


def per_expert_names(state_dict: dict, arch: str) -> dict:
    """transformers 5's stacked experts written out as on-disk checkpoints name them, one tensor per expert."""
    out = {}
    for name, t in state_dict.items():
        m = re.match(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if m is None:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if arch == "mixtral" else name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if arch == "mixtral":
                base = f"{prefix}.block_sparse_moe.experts.{e}"
                names = (f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight")
            else:
                base = f"{prefix}.mlp.experts.{e}"
                names = (f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight")
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                out[names[0]], out[names[1]] = gate.clone(), up.clone()
            else:
                out[names[2]] = t[e].clone()
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe_dense"])
def test_per_expert_checkpoint_names_give_the_same_logits(arch, tmp_path):
    cfg = CONFIGS[arch]()
    model = hf_model(cfg)
    fused = model.state_dict()
    split = per_expert_names(fused, "mixtral" if arch == "mixtral" else "qwen3_moe")
    assert not any("experts.gate_up_proj" in n for n in split) and any(".experts.3." in n for n in split)
    prompts = _prompts(cfg, [9, 17])
    a = paged_logits(_runner(cfg, fused.items()), prompts, 16)
    b = paged_logits(_runner(cfg, list(split.items())[::-1]), prompts, 16)  # any order
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # transformers 5 itself writes the per-expert names on save; its directory loads as the hub's would.
    from pagedllm.model.loader import iter_weights, resolve_model

    model.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    names = [n for n, _ in iter_weights(source)]
    assert any(re.search(r"experts\.\d+\.", n) for n in names)
    c = paged_logits(_runner(source.config, iter_weights(source)), prompts, 16)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_phi3_checkpoint_loads_its_fused_projections_directly():
    cfg = CONFIGS["phi3"]()
    sd = hf_model(cfg).state_dict()
    assert "model.layers.0.self_attn.qkv_proj.weight" in sd and "model.layers.0.mlp.gate_up_proj.weight" in sd
    from pagedllm.model.arch_config import ArchConfig
    from pagedllm.model.models.phi3 import Phi3ForCausalLM

    model = Phi3ForCausalLM(ArchConfig.from_hf(cfg))
    model.load_weights(sd.items())
    layer = model.layers[0]
    assert torch.equal(layer.self_attn.qkv_proj.weight, sd["model.layers.0.self_attn.qkv_proj.weight"])
    assert torch.equal(layer.mlp.gate_up_proj.weight, sd["model.layers.0.mlp.gate_up_proj.weight"])


def test_expert_weight_errors_are_clear():
    cfg = CONFIGS["mixtral"]()
    split = per_expert_names(hf_model(cfg).state_dict(), "mixtral")
    missing = {k: v for k, v in split.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    with pytest.raises(ValueError, match=r"missing weights.*layers\.1\.mlp\.experts\.gate_up_proj"):
        _runner(cfg, missing.items())
    extra = dict(split)
    extra["model.layers.0.block_sparse_moe.experts.6.w1.weight"] = split["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.6\.w1.*no place for"):
        _runner(cfg, extra.items())
    wrong = dict(split)
    wrong["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(72, 95)
    with pytest.raises(ValueError, match=r"experts\.1\.w2.*shape \(72, 95\), expected \(72, 96\)"):
        _runner(cfg, wrong.items())


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_block_runs_each_routed_expert_once(monkeypatch, renormalize):
    """The sparse block groups tokens by expert: one gate/up and one down product per expert that has tokens, the
    same as running every token through its experts one by one; packed for oneDNN, the same again."""
    from pagedllm.model.models import moe

    torch.manual_seed(0)
    block = moe.SparseMoeBlock(32, 24, 6, 2, renormalize, weights_in_model_dtype=False)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(50, 32)
    calls = []
    F = torch.nn.functional
    counting = SimpleNamespace(linear=lambda a, w: calls.append(a.shape[0]) or F.linear(a, w), silu=F.silu)
    monkeypatch.setattr(moe, "F", counting)
    with torch.inference_mode():
        out = block(x)
    probs = torch.softmax(block.gate(x).float(), -1)
    w, idx = torch.topk(probs, 2, -1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    assert len(calls) == 2 * idx.unique().numel() and sum(calls) == 2 * 2 * 50  # each (token, expert) pair once
    want = torch.zeros_like(x)
    for t in range(50):
        for j in range(2):
            e = idx[t, j]
            g, u = (block.experts.gate_up_proj[e] @ x[t]).chunk(2)
            want[t] += w[t, j] * (block.experts.down_proj[e] @ (F.silu(g) * u))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    if block.experts.pack():
        assert block.experts.gate_up_proj is None
        with torch.inference_mode():
            torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["phi3_longrope", "phi3_partial", "mixtral", "qwen3_moe_dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cpu_ops_give_the_logits_of_torch_ops(arch, dtype):
    """The native kernels (norms, SiLU-and-mul, rope + KV store where the whole head rotates, LongRoPE's long rows
    too: the first prompt is longer than the original length) against torch's ops."""
    from pagedllm.kernels.cpu import ops as cpu_ops
    from pagedllm.model.layer_kernels import fused_ops
    from pagedllm.model.layers import FusedRMSNorm

    if not cpu_ops.available(torch.empty(1, dtype=dtype)):
        pytest.skip("CPU kernels did not build")
    cfg = CONFIGS[arch]()
    weights = hf_model(cfg).state_dict()
    prompts = _prompts(cfg, [95, 7, 41, 2], seed=2)
    plans = [[90] + [1] * 5, [7], [20, 21], [1, 1]]
    runs = []
    for native in (True, False):
        with fused_ops(native):  # chosen at load time
            runner = _runner(cfg, weights.items(), dtype=dtype)
        assert isinstance(runner.model.norm, FusedRMSNorm) == native
        assert runner.model.layers[0].self_attn.fused_rope == (native and arch in ("phi3_longrope", "mixtral"))
        if arch in ("mixtral", "qwen3_moe_dense"):  # the experts are laid out for oneDNN too
            assert runner.model.layers[-1].mlp.experts.packed is not None
        runs.append(torch.cat(logits_in_steps(runner, prompts, plans, 16)))
    if dtype == torch.float32:
        torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(runs[0], runs[1], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- greedy generation through the engine

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
GENERATE = {
    # LongRoPE past an original length of 128: prompts longer and shorter than it.
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0, original_max_position_embeddings=128,
                                            rope_parameters=longrope(8, 128)),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=48),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**TINY, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                                     moe_intermediate_size=48),
}


def save_tiny_model(path, cfg):
    """A random-weight model with sharp logits (few near-ties in greedy decoding) and a word-level tokenizer."""
    from pagedllm.model.synthetic import word_level_tokenizer

    torch.manual_seed(1)  # seed 0 makes the phi3 model repeat one token after a long prompt
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)
    model.save_pretrained(path)
    word_level_tokenizer(cfg.vocab_size).save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", sorted(GENERATE))
def test_greedy_generation_equals_transformers(arch, tmp_path):
    from pagedllm import LLM, SamplingParams

    cfg = GENERATE[arch]()
    model = save_tiny_model(tmp_path, cfg)
    prompts = _prompts(cfg, [150, 20])  # phi3: 150 + 100 past its original length 128, 20 + 100 within it
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=16, core_process=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert len(set(out.outputs[0].token_ids)) > 5  # not stuck on one token: a comparison that can fail
        assert out.outputs[0].token_ids == hf_greedy(model, p, 100)


def test_phi3_decoding_past_the_original_length_keeps_generate_until_there(tmp_path):
    """The documented difference: a sequence that grows past original_max_position_embeddings while decoding. Up to
    there both use the short factors and agree; transformers then recomputes its whole cache with the long ones,
    while the keys in our cache keep the short factors' rotation."""
    from pagedllm import LLM, SamplingParams

    cfg = GENERATE["phi3"]()
    model = save_tiny_model(tmp_path, cfg)
    prompt = _prompts(cfg, [100])[0]
    llm = LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=16, core_process=False)
    ours = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    # Token j comes from position 100 + j - 1, computed in the step that makes the sequence 100 + j long.
    short = 128 - 100 + 1
    assert ours[:short] == hf_greedy(model, prompt, 60)[:short]


# ---------------------------------------------------------------- GGUF, as llama.cpp's convert_hf_to_gguf.py writes it

def _gguf_model(arch: str):
    """A tiny model over test_loader's GGUF vocabulary, with random norms (a wrong mapping cannot hide behind ones)."""
    from test_loader import _tiny_vocab

    common = dict(vocab_size=len(_tiny_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1)
    if arch == "phi3":  # Phi-3-mini-4k: sliding window, default rope
        cfg = transformers.Phi3Config(**common, pad_token_id=1, sliding_window=8)
    elif arch == "phi3_longrope":  # Phi-4-mini: partial rotary, LongRoPE, tied embeddings
        cfg = transformers.Phi3Config(**common, pad_token_id=1, tie_word_embeddings=True, original_max_position_embeddings=16,
                                      rope_parameters=longrope(6, 16, partial_rotary_factor=0.75))
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:  # qwen3_moe, renormalised as llama.cpp runs it
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=40, norm_topk_prob=True)
    return sharp_attention(hf_model(cfg)) if arch.startswith("phi3") else hf_model(cfg)


def _write_gguf(path, model, arch: str) -> None:
    """What convert_hf_to_gguf.py writes for Phi3ForCausalLM (phi3), MixtralForCausalLM (llama with experts) and
    Qwen3MoeForCausalLM (qwen3moe): keys, tensor names from gguf-py's own map, q/k permuted for llama, experts stacked."""
    import gguf
    from test_loader import CHAT_TEMPLATE, _llama_cpp_permute, _tiny_vocab, add_size_keys

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens, types, merges = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    add_size_keys(w, cfg)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    rope = cfg.rope_parameters
    if arch == "phi3":
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope["rope_type"] == "longrope":
            scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            w.add_rope_scaling_attn_factors((1 + np.log(scale) / np.log(cfg.original_max_position_embeddings)) ** 0.5)
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    else:
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map({"phi3": gguf.MODEL_ARCH.PHI3, "llama": gguf.MODEL_ARCH.LLAMA,
                                      "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}[arch], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        a = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name):
            # Stacked per kind as the converter merges them (Mixtral: w1 gate, w3 up, w2 down).
            layer = m.group(1)
            parts = dict(zip(("gate_proj", "up_proj"), np.split(a, 2, axis=1))) if m.group(2) == "gate_up_proj" \
                else {"down_proj": a}
            for kind, stacked in parts.items():
                merged = (f"layers.{layer}.feed_forward.experts.{dict(gate_proj='w1', up_proj='w3', down_proj='w2')[kind]}.weight"
                          if arch == "llama" else f"model.layers.{layer}.mlp.experts.{kind}.weight")
                w.add_tensor(names.get_name(merged, try_suffixes=(".weight",)), np.ascontiguousarray(stacked))
            continue
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            a = _llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        hf_name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if arch == "llama" else name
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["phi3", "phi3_longrope", "mixtral", "qwen3_moe"])
def test_tiny_gguf_converts_exactly(arch, tmp_path, monkeypatch):
    import dataclasses

    from pagedllm.model.arch_config import ArchConfig
    from pagedllm.model.loader import iter_weights, resolve_model

    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    model = _gguf_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, model, {"mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(arch, "phi3"))
    source = resolve_model(str(path))
    assert type(transformers.AutoConfig.from_pretrained(source.path)) is type(model.config)

    ours, theirs = dataclasses.asdict(source.config), dataclasses.asdict(ArchConfig.from_hf(model.config))
    assert ours.pop("rms_norm_eps") == pytest.approx(theirs.pop("rms_norm_eps"), rel=1e-6)
    for d in (ours, theirs):
        d.pop("eos_token_id"), d.pop("hf")
    rope_ours, rope_theirs = ours.pop("rope_parameters"), theirs.pop("rope_parameters")
    assert ours == theirs  # shapes, heads, windows, tying
    assert rope_ours["rope_type"] == rope_theirs["rope_type"]
    for key in ("rope_theta", "short_factor", "long_factor"):  # factors went through float32
        if key in rope_theirs or key in rope_ours:
            assert rope_ours[key] == pytest.approx(rope_theirs[key], rel=1e-6), key
    for key in ("num_experts_per_tok", "num_local_experts", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                "original_max_position_embeddings", "partial_rotary_factor", "sliding_window"):
        assert source.config.hf.get(key) == model.config.to_dict().get(key) or key == "num_experts", key

    # The weights, under the names transformers itself saves (per expert for the experts).
    model.save_pretrained(tmp_path / "hf")
    saved = dict(iter_weights(resolve_model(str(tmp_path / "hf"))))
    got = dict(iter_weights(source))
    assert set(got) == set(saved)
    for name, tensor in got.items():
        assert torch.equal(tensor, saved[name]), name

    # The same logits as the original: in transformers, and in pagedllm (one-chunk prefills: long and short LongRoPE).
    converted = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    prompts = _prompts(model.config, [20, 11], seed=3)
    for p in prompts:
        with torch.no_grad():
            torch.testing.assert_close(converted(torch.tensor([p])).logits, model(torch.tensor([p])).logits,
                                       rtol=1e-5, atol=1e-5)
    runner = _runner(source.config, iter_weights(source))
    for p, o in zip(prompts, logits_in_steps(runner, prompts, [[20], [11]], 16)):
        torch.testing.assert_close(o, _reference(model, p), atol=2e-4, rtol=1e-4)


def test_moe_models_are_not_captured_in_cuda_graphs():
    """The experts' token counts are read on the host: no decode graphs, whatever the attention backend."""
    from pagedllm.worker.cuda_graphs import capture_decode_graphs

    cfg = CONFIGS["qwen3_moe"]()
    runner = SimpleNamespace(attn_backend=SimpleNamespace(cuda_graph_safe=True), model=_runner(cfg, None).model)
    assert capture_decode_graphs(runner, max_num_seqs=4, max_model_len=64) is None
