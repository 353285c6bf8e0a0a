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


def test_sliding_and_global_layers_read_their_own_metadata():
    """KV cache groups: sliding and global layers keep their blocks in different groups, each with its own tables;
    a sliding group's entries behind every window are placeholders that may name any block (here: one of NaN)."""
    from pagedllm.engine.kv_cache import NULL_BLOCK, KVCacheManager
    from pagedllm.engine.request import Request
    from pagedllm.engine.scheduler import ScheduledRequest

    cfg = CONFIGS["gemma3"]()
    model = gemma_model(cfg)
    prompt = prompts_for(cfg, seed=7)[2]  # 41 tokens
    bs, junk = 4, 60
    runner = ModelRunner(cfg, model.state_dict().items(), device=torch.device("cpu"), dtype=torch.float32, block_size=bs)
    windows = [g.window for g in runner.kv_groups]
    assert None in windows and any(windows)
    runner.allocate_kv_cache(junk + 1)
    for cache in runner.kv_caches:
        cache[:, junk] = float("nan")
    kv = KVCacheManager(junk, bs, group_windows=tuple(windows))
    kv.allocate_slots("pad", 0, 7 * bs)  # so that tables are not the identity
    req = Request("r0", prompt[:1], None)
    req.all_token_ids = list(prompt)
    window = cfg.sliding_window
    got = []
    for n in [17, 20, 1, 1, 1, 1]:
        assert kv.allocate_slots("r0", req.num_computed_tokens, n)
        step = ScheduledRequest(req, req.num_computed_tokens, n, kv.get_block_tables("r0"))
        input_ids, positions, meta, _, _ = runner._prepare([step])
        behind = max(0, req.num_computed_tokens - window + 1) // bs  # blocks before the first query's window
        for m, w in zip(meta, runner.model.config.layer_windows):
            assert (m.num_common_prefix_blocks == 0) if w else True
            if w:
                m.block_tables[:, :behind] = junk
        with torch.inference_mode():
            got.append(runner.model.compute_logits(runner.model(input_ids, positions, runner.kv_caches, meta)))
        req.num_computed_tokens += n
        kv.check_invariants()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-4, rtol=1e-4)
    # The sliding groups gave back the blocks behind the window; the global one kept all of them.
    for table, w in zip(kv.get_block_tables("r0"), windows):
        assert (table[0] == NULL_BLOCK) == bool(w) and len(table) == -(-len(prompt) // bs)


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


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_a_bare_config_json_gets_the_config_class_defaults(model_type):
    """Caps, window, layer kinds, rope bases, score scale and tying that config.json leaves out."""
    from pagedllm.model.models.registry import model_class

    d = dict(model_type=model_type, vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=6,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    cfg = ArchConfig.from_dict(d)
    with torch.device("meta"):
        ours = model_class(cfg)(cfg)
    ref = transformers.AutoConfig.for_model(**d)
    attn = [layer.self_attn.attn for layer in ours.layers]
    assert [a.sliding_window for a in attn] == [ref.sliding_window if t == "sliding_attention" else None
                                                for t in ref.layer_types]
    assert {a.scale for a in attn} == {ref.query_pre_attn_scalar**-0.5}
    assert ours.final_soft_cap == ref.final_logit_softcapping
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    if model_type == "gemma2":
        assert {a.logits_soft_cap for a in attn} == {ref.attn_logit_softcapping}
        assert ours.rotaries["all"].params["rope_theta"] == ref.rope_parameters["rope_theta"]
    else:
        for kind, rotary in ours.rotaries.items():
            assert rotary.params["rope_theta"] == ref.rope_parameters[kind]["rope_theta"], kind


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


def test_sparse_multimodal_gemma3_config_gets_transformers_defaults():
    """gemma-3-4b's config.json names six numbers of its text decoder and leaves the rest to Gemma3TextConfig."""
    sparse = dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                  rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
    ours = ArchConfig.from_dict({"model_type": "gemma3", "text_config": sparse, "eos_token_id": [1, 106]})
    ref = transformers.Gemma3Config(text_config=dict(sparse)).text_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "sliding_window"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.layer_windows == tuple(1024 if t == "sliding_attention" else None for t in ref.layer_types)
    rope = gemma3_rope_parameters(ours.hf)
    for kind in ("sliding_attention", "full_attention"):
        assert {k: rope[kind][k] for k in ref.rope_parameters[kind]} == ref.rope_parameters[kind], kind


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


# ---------------------------------------------------------------- GGUF, as llama.cpp writes Gemma

# Our names -> llama.cpp's, written out here rather than taken from the converter's table.
_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


def _gemma_vocab():
    from test_loader import _tiny_vocab

    tokens, types, merges = _tiny_vocab()
    return tokens + ["<end_of_turn>"], types + [3], merges


# A sentencepiece vocabulary shaped like Gemma's ("llama" in the GGUF, no merges, no space prefix).
SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\u2581", "t", "h", "e",
              "\u2581t", "he", "\u2581the"]
SPM_TYPES = [3, 3, 3, 2, 3, 3] + [1] * (len(SPM_TOKENS) - 6)


def _write_gemma_gguf(path, model, swa_pattern=None, swa_base=None, spm=False) -> None:
    """What llama.cpp's Gemma2Model / Gemma3Model write: no query_pre_attn_scalar, no rope_local_base_freq
    (newer converters: rope.freq_base_swa), no layer pattern, Gemma 2 without rope.freq_base; norms plus 1."""
    import gguf
    import numpy as np
    from test_loader import CHAT_TEMPLATE, add_size_keys

    cfg = model.config
    arch = "gemma2" if cfg.model_type == "gemma2" else "gemma3"
    tokens, types, merges = (SPM_TOKENS, SPM_TYPES, None) if spm else _gemma_vocab()
    assert cfg.vocab_size == len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    add_size_keys(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        if full["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if swa_base is not None:
            w.add_rope_freq_base_swa(swa_base)
        if swa_pattern is not None:
            w.add_sliding_window_pattern(swa_pattern)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0] * len(tokens))
        w.add_bos_token_id(2)
        w.add_unk_token_id(3)
        w.add_add_space_prefix(False)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        a = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight":
            continue  # tied, and llama.cpp's Gemma 2 converter drops it anyway
        if name.endswith("norm.weight"):
            a = a + np.float32(1.0)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, *rest = name.split(".")
            gname = f"blk.{layer}.{_GGUF_BLOCK['.'.join(rest[:-1])]}.{rest[-1]}"
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    # Gemma 2 as llama.cpp writes it: no rope base in the file, caps and window in it.
    "gemma2": (lambda v: transformers.Gemma2Config(
        **dict(COMMON, vocab_size=v, query_pre_attn_scalar=16), num_hidden_layers=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0), {}),
    # Gemma 3 from a converter that writes neither the local rope base nor the pattern: llama.cpp's 10000 and 6.
    "gemma3": (lambda v: transformers.Gemma3TextConfig(
        **dict(COMMON, vocab_size=v, query_pre_attn_scalar=16), num_hidden_layers=6, final_logit_softcapping=5.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}), {}),
    # Gemma 3 with rope.freq_base_swa and a per-layer pattern in the file, and a sentencepiece vocabulary.
    "gemma3_keys": (lambda v: transformers.Gemma3TextConfig(
        **dict(COMMON, vocab_size=len(SPM_TOKENS), query_pre_attn_scalar=16), num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_base_freq=100.0),
        dict(swa_pattern=[True, False, True], swa_base=100.0, spm=True)),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_tiny_gemma_gguf_converts_exactly(tmp_path, monkeypatch, case):
    import dataclasses

    from pagedllm.model.loader import iter_weights, resolve_model

    pytest.importorskip("gguf")
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    make_config, keys = GGUF_CASES[case]
    cfg = make_config(len(_gemma_vocab()[0]))
    model = gemma_model(cfg)
    path = tmp_path / f"tiny-{case}.gguf"
    _write_gemma_gguf(path, model, **keys)

    source = resolve_model(str(path))
    ours, theirs = dataclasses.asdict(source.config), dataclasses.asdict(ArchConfig.from_hf(cfg))
    assert ours.pop("rms_norm_eps") == pytest.approx(theirs.pop("rms_norm_eps"), rel=1e-6)
    for d in (ours, theirs):
        d.pop("eos_token_id"), d.pop("hf")
        if case != "gemma2":  # Gemma 3's ropes are read from hf (below); the shared field holds the global one
            d.pop("rope_parameters")
    assert ours == theirs
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "hidden_activation"):
        assert source.config.hf.get(key) == cfg.to_dict().get(key), key
    if case != "gemma2":
        got, want = gemma3_rope_parameters(source.config.hf), gemma3_rope_parameters(ArchConfig.from_hf(cfg).hf)
        for kind in want:
            assert {k: got[kind][k] for k in want[kind]} == want[kind], kind
    end_of_turn = 5 if keys.get("spm") else len(_gemma_vocab()[0]) - 1
    assert source.eos_token_ids == [1, end_of_turn]  # eos, and <end_of_turn>, where llama.cpp stops too
    if keys.get("spm"):
        from pagedllm.tokenizer import load_tokenizer

        tok = load_tokenizer(source.path)
        assert tok.encode("the")[0] == tok.bos_token_id == 2 and tok.decode(tok.encode("the")) == "<bos>the"

    # Norms come back as (w + 1) - 1 in float32, which (1 + w) turns back into exactly the original's scale.
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    weights = dict(iter_weights(source))
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        if name.endswith("norm.weight"):
            assert torch.equal(1.0 + tensor, 1.0 + expected[name]), name
        else:
            assert torch.equal(tensor, expected[name]), name

    prompts = prompts_for(cfg, seed=6)[:2]
    runner = ModelRunner(source.config, weights.items(), device=torch.device("cpu"), dtype=torch.float32, block_size=4)
    assert_logits_match(model, prompts, paged_logits(runner, prompts, 4))
    converted = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gguf_query_scale_follows_llama_cpp_for_the_27b_models():
    """llama.cpp scales by hidden_size / num_heads in the 27B models (their query_pre_attn_scalar), else head_dim."""
    from types import SimpleNamespace

    from pagedllm.model import gguf_convert

    def config(arch, layers, hidden, heads, head_dim):
        meta = {"attention.sliding_window": 4096}
        embed = SimpleNamespace(name="token_embd.weight", shape=(hidden, 300))
        g = SimpleNamespace(arch=arch, path="x.gguf", reader=SimpleNamespace(tensors=[embed]),
                            arch_get=lambda key, default=None: meta.get(key, default))
        common = dict(vocab_size=300, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return gguf_convert._gemma_hf_config(g, common, head_dim)

    assert config("gemma2", 46, 4608, 32, 128).query_pre_attn_scalar == 144  # Gemma 2 27B
    assert config("gemma2", 42, 3584, 16, 256).query_pre_attn_scalar == 256  # Gemma 2 9B
    assert config("gemma3", 62, 5376, 32, 128).query_pre_attn_scalar == 168  # Gemma 3 27B
    g3 = config("gemma3", 34, 2560, 8, 256)  # Gemma 3 4B
    assert g3.query_pre_attn_scalar == 256
    assert g3.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
