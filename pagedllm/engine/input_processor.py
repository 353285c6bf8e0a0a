"""Prompt and parameters -> a validated EngineCoreRequest, on the frontend side.

Everything a request could get wrong is found here, before it reaches the
core: the prompt's shape, its token ids against the vocabulary, its length
against the context, and the sampling parameters (SamplingParams checks its
own ranges when it is built, and again here, on the request's own copy). A
bad input raises ValueError saying what was wrong and what is allowed; nothing
is submitted.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Any

from pagedllm.engine.messages import EngineCoreRequest
from pagedllm.sampling_params import MAX_LOGPROBS, SamplingParams
from pagedllm.tokenizer import check_text

_PROMPT_SHAPES = 'a prompt must be a string, {"prompt": str} or {"prompt_token_ids": [int, ...]}'


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, max_logprobs: int = MAX_LOGPROBS) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs  # -1: no limit
        self._ids = itertools.count()

    def process(self, prompt: str | dict, params: SamplingParams | None = None, request_id: str | None = None) -> EngineCoreRequest:
        """Check a prompt and its parameters; raise ValueError saying what is wrong. Submits nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params = params.checked_copy()
        if isinstance(prompt, str):
            text, token_ids = prompt, self._encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, token_ids = prompt.get("prompt"), _token_id_list(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            text, token_ids = prompt["prompt"], self._encode(prompt["prompt"])
        else:
            raise ValueError(f"{_PROMPT_SHAPES}, got {repr(prompt)[:80]}")
        self._check_token_ids(token_ids)
        self._check_vocab_params(params)
        self._check_num_logprobs(params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        return EngineCoreRequest(request_id, list(token_ids), params, prompt=text)

    def _check_vocab_params(self, params: SamplingParams) -> None:
        """Token ids in logit_bias, allowed_token_ids and logprob_token_ids must be in the vocabulary; bad_words
        become token ids."""
        vocab = self.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("logprob_token_ids", params.logprob_token_ids or ())):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} has token id {bad[0]}, out of range: token ids must be in [0, {vocab})")
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)

    def _check_num_logprobs(self, params: SamplingParams) -> None:
        """logprobs and prompt_logprobs against max_logprobs. As vLLM: -1 in a request counts as the whole
        vocabulary, and max_logprobs -1 allows it."""
        vocab = self.vocab_size
        limit = vocab if self.max_logprobs == -1 else self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is None or -1 <= value and (vocab if value == -1 else value) <= limit:
                continue
            if value == -1:
                raise ValueError(f"{name} -1 asks for the whole vocabulary ({vocab} tokens), which this engine allows "
                                 f"only when started with max_logprobs -1 (--max-logprobs -1); it allows up to "
                                 f"{self.max_logprobs}")
            raise ValueError(f"{name} must be in [0, {limit}] (the engine's max_logprobs), or -1 for the whole "
                             f"vocabulary where that allows it; got {value}")

    def _encode(self, text: str) -> list[int]:
        check_text("the prompt", text)
        return self.tokenizer.encode(text)

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but the model's context (max_model_len) is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for an output token"
            )


def _token_id_list(token_ids) -> list[int]:
    """prompt_token_ids as plain ints: a list or tuple of integers, or an array or tensor of them (numpy, torch)."""
    if not isinstance(token_ids, (list, tuple, str)) and callable(getattr(token_ids, "tolist", None)):
        token_ids = token_ids.tolist()
    if not isinstance(token_ids, (list, tuple)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in token_ids):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {repr(token_ids)[:80]}")
    return [int(t) for t in token_ids]


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each bad word as the tokens it is written with, alone and after a space (as vLLM bans them): mid-text,
    most tokenizers spell " word" with other tokens than "word"."""
    sequences: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences
