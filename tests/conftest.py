from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The embedded SmolLM2 converted to a Hugging Face directory (cached after the first conversion)."""
    from pagedllm.model.loader import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_path) -> str:
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
    from pagedllm.tokenizer import load_tokenizer

    load_tokenizer(default_model_path).save_pretrained(path)
    return str(path)
