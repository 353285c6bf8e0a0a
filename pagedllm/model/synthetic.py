"""A model directory built from a config alone: random weights and a word-level tokenizer over its whole vocabulary.

For runs where no checkpoint may be fetched and none is installed (a GPU
machine with no network, the GPU check's dry run): the weights are
transformers' own random initialisation, saved once, so every engine that
loads the directory (pagedllm, transformers) computes with the same numbers;
the tokenizer maps token id i to the word "t<i>", so any id decodes.
"""

from __future__ import annotations

import os


def word_level_tokenizer(vocab_size: int):
    """A fast tokenizer whose token i is "t<i>" (0, 1, 2: <unk>, <s>, </s>), for ids-only workloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model_dir(path: str, config, dtype: str = "bfloat16", seed: int = 0) -> str:
    """Save a random-weight model of `config` (a transformers config) and a word-level tokenizer into path."""
    import torch
    import transformers

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    word_level_tokenizer(config.vocab_size).save_pretrained(path)
    return path
