"""Tiny random-weight Gemma 2 and Gemma 3 models: our logits and greedy tokens equal transformers'.

Windows are 8 tokens, shorter than most prompts, so sliding layers drop keys
while global layers keep them all. Embeddings and q/k projections are scaled
up so that what Gemma adds (soft-capping, each layer kind's rope, the score
scale) moves the logits far beyond the tolerance.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from test_models import hf_model, paged_logits

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.models.gemma import gemma3_rope_parameters
from pagedllm.worker.model_runner import ModelRunner

COMMON = dict(
    vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=8, query_pre_attn_scalar=24,
)
MIXED = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]

CONFIGS = {
    # Gemma 2: sliding and global layers alternate; small caps, so that capping changes the logits.
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, num_hidden_layers=4, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=5.0),
    "gemma2_untied_mha": lambda: transformers.Gemma2Config(
        **{**COMMON, "num_key_value_heads": 4}, num_hidden_layers=2, tie_word_embeddings=False),
    # Gemma 3: local and global rope bases, linear scaling (factor 8 in the real 4B-27B configs) on the global one.
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=5, layer_types=MIXED,
                                                    rope_scaling={"rope_type": "linear", "factor": 8.0},
                                                    rope_local_base_freq=100.0),
    # transformers never applies Gemma 3's attn_logit_softcapping; the final cap it does apply.
    "gemma3_capped": lambda: transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=3, sliding_window_pattern=3,
                                                           final_logit_softcapping=5.0, attn_logit_softcapping=2.0),
}
LENGTHS = [23, 7, 41, 2]


def gemma_model(cfg, seed=0):
    model = hf_model(cfg, seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def prompts_for(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]


def assert_logits_match(model, prompts, ours, atol=2e-4):
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(o, ref, atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("arch,block_size", [("gemma2", 1), ("gemma2", 16), ("gemma3", 1), ("gemma3", 16),
                                             ("gemma2_untied_mha", 16), ("gemma3_capped", 16)])
def test_logits_match_transformers(models, arch, block_size):
    cfg = CONFIGS[arch]()
    model = models.setdefault(arch, gemma_model(cfg))
    prompts = prompts_for(cfg)
    runner = ModelRunner(cfg, model.state_dict().items(), device=torch.device("cpu"), dtype=torch.float32,
                         block_size=block_size)
    assert_logits_match(model, prompts, paged_logits(runner, prompts, block_size))


def test_layer_kinds_come_from_the_config():
    g2 = ArchConfig.from_hf(CONFIGS["gemma2"]())
    assert g2.layer_windows == (8, None, 8, None)
    g3 = ArchConfig.from_hf(CONFIGS["gemma3_capped"]())
    assert g3.layer_windows == (8, 8, None)
    runner = ModelRunner(g3, None, device=torch.device("cpu"), dtype=torch.float32, block_size=16)
    layers = runner.model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [8, 8, None]
    assert all(layer.self_attn.attn.logits_soft_cap is None for layer in layers)  # not applied, as in transformers
    assert layers[0].self_attn.rotary is not layers[2].self_attn.rotary


def test_native_cpu_backend_gives_the_same_logits():
    from pagedllm.model.attention.selector import get_attention_backend

    try:
        backend = get_attention_backend("cpu", "cpu")
    except ValueError as exc:
        pytest.skip(str(exc))
    for name in ("gemma2", "gemma3"):
        cfg = CONFIGS[name]()
        model = gemma_model(cfg)
        prompts = prompts_for(cfg, seed=2)
        runner = ModelRunner(cfg, model.state_dict().items(), device=torch.device("cpu"), dtype=torch.float32,
                             block_size=16, attn_backend=backend)
        assert all(isinstance(layer.self_attn.attn, backend) for layer in runner.model.layers)
        assert_logits_match(model, prompts, paged_logits(runner, prompts, 16))


def test_bfloat16_logits_stay_close_to_transformers():
    """bf16 rounds in other places than float32 (the embedding scale, each norm's output, the capped logits)."""
    cfg = CONFIGS["gemma2"]()
    model = gemma_model(cfg).to(torch.bfloat16)
    prompts = prompts_for(cfg, seed=3)
    runner = ModelRunner(cfg, model.state_dict().items(), device=torch.device("cpu"), dtype=torch.bfloat16, block_size=16)
    assert runner.model.embed_scale.dtype == torch.bfloat16 and runner.model.embed_scale.item() == 8.0
    ours = paged_logits(runner, prompts, 16)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].float()
        assert (o - ref).abs().max() < 0.1 * ref.abs().max()
        assert (o.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_old_style_gemma3_config_reads_as_transformers_reads_it():
    """A config.json from before layer_types and per-layer-type rope_parameters (the released Gemma 3 files)."""
    raw = dict(
        model_type="gemma3_text", vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=6,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"factor": 8.0, "rope_type": "linear"},
        query_pre_attn_scalar=16,
    )
    ours = ArchConfig.from_dict(raw)
    ref = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert ours.layer_windows == tuple(8 if t == "sliding_attention" else None for t in ref.layer_types)
    assert ours.layer_windows == (8, 8, 8, 8, 8, None, 8)
    rope = gemma3_rope_parameters(ours.hf)
    for kind in ("sliding_attention", "full_attention"):
        for key, value in ref.rope_parameters[kind].items():
            assert rope[kind][key] == value, (kind, key)
    # A multimodal config (text_config inside) gives the same text decoder.
    mm = ArchConfig.from_dict({"model_type": "gemma3", "text_config": {k: v for k, v in raw.items() if k != "model_type"}})
    assert mm.layer_windows == ours.layer_windows and gemma3_rope_parameters(mm.hf) == rope


def test_multimodal_checkpoint_names_load_the_text_decoder():
    cfg = CONFIGS["gemma3"]()
    model = gemma_model(cfg)
    prompts = prompts_for(cfg, seed=4)[:2]
    text = {k: v for k, v in cfg.to_dict().items() if k != "model_type"}
    mm_cfg = ArchConfig.from_dict({"model_type": "gemma3", "text_config": text})
    # The released files' names (language_model.model.*) and transformers 5's (model.language_model.*), with a vision tower.
    for prefix in ("language_model.model.", "model.language_model."):
        weights = {k.replace("model.", prefix, 1): v for k, v in model.state_dict().items() if k.startswith("model.")}
        weights["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(3)
        weights["model.multi_modal_projector.mm_input_projection_weight"] = torch.zeros(3)
        runner = ModelRunner(mm_cfg, weights.items(), device=torch.device("cpu"), dtype=torch.float32, block_size=16)
        assert_logits_match(model, prompts, paged_logits(runner, prompts, 16))


def test_wrong_and_missing_weights_are_clear_errors():
    cfg = CONFIGS["gemma3"]()
    sd = gemma_model(cfg).state_dict()
    cpu = dict(device=torch.device("cpu"), dtype=torch.float32, block_size=16)
    missing = {k: v for k, v in sd.items() if "layers.1.pre_feedforward_layernorm" not in k}
    with pytest.raises(ValueError, match="missing weights.*layers.1.pre_feedforward_layernorm"):
        ModelRunner(cfg, missing.items(), **cpu)
    wrong = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.zeros(8)})
    with pytest.raises(ValueError, match="q_norm.weight.*shape"):
        ModelRunner(cfg, wrong.items(), **cpu)
    extra = dict(sd, **{"model.layers.0.self_attn.rel_pos.weight": torch.zeros(8)})
    with pytest.raises(ValueError, match="no place for"):
        ModelRunner(cfg, extra.items(), **cpu)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny_gemma_dir(request, tmp_path_factory):
    """A tiny Gemma saved as Hugging Face files, with a word-level tokenizer over its vocabulary.

    Its head is untied: a tiny model whose head is its embedding mostly repeats the token it just read.
    """
    from pagedllm.model.synthetic import word_level_tokenizer

    common = dict(COMMON, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if request.param == "gemma2":  # the real caps (50, 30)
        cfg = transformers.Gemma2Config(**common, num_hidden_layers=4)
    else:
        cfg = transformers.Gemma3TextConfig(**common, num_hidden_layers=5, layer_types=MIXED,
                                            rope_scaling={"rope_type": "linear", "factor": 8.0})
    model = hf_model(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
        model.model.norm.weight.add_(5.0)  # sharper logits: fewer near-ties in greedy decoding
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    word_level_tokenizer(cfg.vocab_size).save_pretrained(path)
    return str(path), model


def test_greedy_generation_equals_transformers(tiny_gemma_dir):
    from pagedllm import LLM, SamplingParams

    path, model = tiny_gemma_dir
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 21)]
    # 4-token blocks and a 16-token budget: the longer prompt is chunked, windows span several blocks.
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, max_model_len=128,
              core_process=False)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                 max_new_tokens=24, min_new_tokens=24, pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref
        assert len(set(ref)) > 8  # not stuck repeating a few tokens
