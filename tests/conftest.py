from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded SmolLM2 converted to a Hugging Face directory (cached after the first conversion).

    Skips where the default model's package is not installed (the GPU machine of benchmarks/gpu_check.py).
    """
    from pagedllm.model.loader import ModelNotFoundError, resolve_model

    try:
        return resolve_model(None).path
    except ModelNotFoundError as exc:
        pytest.skip(f"the default model is not installed here: {exc}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random-weight Llama (9 query heads over 3 KV heads) with the default model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=72, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)  # sharper logits: fewer near-ties in greedy decoding
    model.save_pretrained(path)
    from pagedllm.model.loader import ModelNotFoundError, resolve_model
    from pagedllm.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(resolve_model(None).path)
    except ModelNotFoundError:  # no default model here: a word-level tokenizer over the same vocabulary
        from pagedllm.model.synthetic import word_level_tokenizer

        tokenizer = word_level_tokenizer(cfg.vocab_size)
    tokenizer.save_pretrained(path)
    return str(path)
