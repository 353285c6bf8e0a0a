"""How to pick each next token, and when to stop.

Names, defaults and ranges follow vLLM's `SamplingParams`, so clients written
for vLLM or the OpenAI API can pass their settings through unchanged. All
checks happen here, at the edge: the sampler and the engine trust what they get.
This module is plain Python so `engine/` can use it without importing torch.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass
from typing import Any

from pagedllm.structured_output.params import StructuredOutputsParams

# Below this temperature sampling is treated as greedy (as vLLM): dividing the
# logits by a tiny number would only overflow to the same argmax.
_GREEDY_EPS = 1e-5
# The default of EngineConfig.max_logprobs: the most top logprobs a request may
# ask for per token (OpenAI's limit too); it keeps the per-step top-k and the
# Python conversion cheap.
MAX_LOGPROBS = 20
# vLLM's cap on logprob_token_ids.
MAX_LOGPROB_TOKEN_IDS = 128
# OpenAI's range for logit_bias values: -100 bans a token, 100 all but forces it.
LOGIT_BIAS_MAX = 100.0
# A seed seeds a torch.Generator, which takes any integer that fits in 64 bits,
# signed or unsigned (OpenAI's API documents seed as an int64).
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty")


class SamplingType(enum.Enum):
    GREEDY = "greedy"
    RANDOM = "random"
    RANDOM_SEED = "random_seed"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    # vLLM's: each output token's logprobs for these ids (in this order) instead of the best `logprobs` (needs
    # logprobs set); cheaper than the whole vocabulary when a fixed set of labels is scored.
    logprob_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # per prompt token: its logprob and the best few (0: its own only)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the rest)
    structured_outputs: StructuredOutputsParams | None = None  # a JSON schema, regex, choice or grammar to follow
    # bad_words as token id sequences, each with and without a leading space; filled in
    # from the tokenizer by the input processor (engine/input_processor.py), not by users.
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._normalise()
        self._check_ranges()
        # Floats from here on (after the checks, so errors quote the value given).
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))

    def checked_copy(self) -> SamplingParams:
        """A copy built again from these fields, so checked again.

        The input processor takes one per request: a field set after
        construction (`params.max_tokens = "5"`) is then refused at the edge,
        with the same message as at construction, instead of failing inside
        the engine core; and the request no longer shares an object that its
        caller may change while it runs.
        """
        return dataclasses.replace(self)

    # -- validation -------------------------------------------------------

    def _check_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            setattr(self, name, _require_int(name, getattr(self, name)))
        for name in ("max_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _require_int(name, value, or_none=True))
        for name in _FLOAT_FIELDS:
            _require_number(name, getattr(self, name))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")

    def _normalise(self) -> None:
        # One spelling per meaning, so later code has a single case to handle.
        if self.top_k == -1:
            self.top_k = 0

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")

        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {t!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self._normalise_logits_processors()

    def _normalise_logits_processors(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a map from token id to bias, got {_short(self.logit_bias)}")
            bad = [key for key in self.logit_bias if _token_id_key(key) is None]
            if bad:  # every bad key at once: a client fixes its map in one round trip
                raise ValueError("logit_bias keys must be token ids (ints >= 0, or their decimal strings), got "
                                 + ", ".join(repr(k) for k in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
            bias = {}
            for key, value in self.logit_bias.items():
                token = _token_id_key(key)
                _require_number(f"logit_bias[{key!r}]", value)
                if not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
                    raise ValueError(f"logit_bias[{key!r}] must be in [-100, 100], got {value}")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = sorted(set(_token_id_list("allowed_token_ids", self.allowed_token_ids)))
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = _token_id_list("logprob_token_ids", self.logprob_token_ids, MAX_LOGPROB_TOKEN_IDS)
            if self.logprobs is None:
                raise ValueError("logprob_token_ids needs logprobs set: its ids take the place of the top logprobs")
        if self.bad_words is not None:
            words = self.bad_words
            if isinstance(words, str) or not isinstance(words, (list, tuple)):
                raise ValueError(f"bad_words must be a list of strings, got {_short(words)}")
            for w in words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"bad_words must contain only non-blank strings, got {w!r}")
            self.bad_words = list(words) or None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise ValueError(f"structured_outputs: {exc}; allowed keys: json, regex, choice, grammar, json_object, "
                                 "disable_any_whitespace") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, got {_short(self.structured_outputs)}")

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.n > 256:
            raise ValueError(f"n must be <= 256 (completions per prompt), got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(
                f"seed must be an integer that fits in 64 bits, in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):  # the upper bound is the engine's max_logprobs (InputProcessor)
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name} must be the number of top logprobs per token, >= 0 (or -1: the whole "
                                 f"vocabulary, where the engine allows it), got {value}")

    # -- derived ------------------------------------------------------------

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type is SamplingType.GREEDY

    @property
    def has_logits_processors(self) -> bool:
        """logit_bias, allowed_token_ids or bad_words: each changes this row's logits before sampling."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def stop_str_hold_back(self) -> int:
        """Characters a stream must hold back: a stop string that is cut (not
        included in the output) may begin this far before the end of the text."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1


class NothingToSample(ValueError):
    """Raised by the sampler for a row with no token left to choose; it ends that request alone."""

    MASKED = "no token is left to sample: the request's constraints mask every token"

    def __init__(self, not_numbers: bool = False) -> None:
        super().__init__("the model's logits for this request are not numbers (NaN)" if not_numbers else
                         f"{self.MASKED} (allowed_token_ids, logit_bias, bad_words, min_tokens against the stop "
                         "tokens, or a grammar)")


def _require_int(name: str, value: Any, or_none: bool = False) -> int:
    # bool is an int subclass; True as a token count is almost surely a bug.
    # numpy integers are accepted and turned into plain ints.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int or None" if or_none else "an int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _token_id_list(name: str, ids: Any, most: int | None = None) -> list[int]:
    """A non-empty list of token ids (ints >= 0), at most `most` long, as plain ints."""
    if not isinstance(ids, (list, tuple)) or not ids or (most is not None and len(ids) > most):
        size = "non-empty" if most is None else f"1 to {most} long"
        raise ValueError(f"{name} must be a {size} list of token ids, got {_short(ids)}")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"{name} must contain only ints >= 0, got {t!r}")
    return [int(t) for t in ids]


def _token_id_key(key: Any) -> int | None:
    """A logit_bias key as a token id (keys are ids or their decimal strings: JSON object keys are strings); None if
    it is neither."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
        return None
    return int(key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
