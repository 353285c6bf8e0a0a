"""Grammars compiled by xgrammar against the model's vocabulary, and one matcher per sequence.

xgrammar precomputes, for each grammar state, which of the vocabulary's
tokens may come next, so filling a sequence's token bitmask each step costs
microseconds and compiling a JSON schema tens of milliseconds (measured in
benchmarks/RESULTS.md); compiling releases the GIL, so it runs on a thread
beside the steps (manager.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pagedllm.structured_output.params import StructuredOutputsParams

# Free whitespace in JSON is allowed (any_whitespace, as vLLM), but at most this
# many characters of it in a row: a small model can otherwise fill max_tokens with
# newlines inside a valid object (llama.cpp's JSON grammars cap it at 20 too).
_MAX_JSON_WHITESPACE = 20


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:  # an install without it: say what to do
        raise RuntimeError("structured outputs need the xgrammar package: pip install xgrammar") from exc
    return xgrammar


class XgrammarBackend:
    def __init__(self, tokenizer_info) -> None:
        """tokenizer_info: an xgrammar TokenizerInfo (the vocabulary as text, its stop tokens); see from_tokenizer."""
        # One thread: the manager runs one compile at a time, beside the steps, which need the other core.
        self.compiler = _xgrammar().GrammarCompiler(tokenizer_info, max_threads=1)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> "XgrammarBackend":
        """For a Hugging Face tokenizer; vocab_size is the model's (its logits' width), which may exceed the tokenizer's."""
        xgr = _xgrammar()
        return cls(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos_token_ids)))

    def compile(self, params: StructuredOutputsParams):
        """A CompiledGrammar; ValueError with the compiler's message when the spec is not valid."""
        kind = params.kind
        try:
            if kind == "json":
                schema = json.dumps(tuple_items_as_prefix_items(
                    json.loads(params.json) if isinstance(params.json, str) else params.json))
                if params.disable_any_whitespace:
                    return self.compiler.compile_json_schema(schema, any_whitespace=False)
                return self.compiler.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=_MAX_JSON_WHITESPACE)
            if kind == "json_object":
                return self.compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return self.compiler.compile_regex(params.regex)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(params.choice))
            if "::=" in params.grammar:
                return self.compiler.compile_grammar(params.grammar)
            return self.compiler.compile_lark(params.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {_first_line(exc)}") from None

    def matcher(self, compiled) -> "GrammarState":
        return GrammarState(_xgrammar().GrammarMatcher(compiled))


class GrammarState:
    """Where one sequence stands in its grammar: which tokens may come next, and whether it is complete."""

    __slots__ = ("matcher",)

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def fill_bitmask(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was taken: nothing more may follow."""
        return self.matcher.is_terminated()


# Values that are data, not subschemas: left as they are.
_DATA_KEYWORDS = ("const", "enum", "default", "examples")


def tuple_items_as_prefix_items(schema: Any) -> Any:
    """A schema with drafts 4 to 2019's tuple form, "items": [s1, s2] (+ "additionalItems"), in 2020-12's
    "prefixItems" form, which the compiler reads: schemas written for older drafts (and llama.cpp's server,
    which takes both) keep their meaning instead of failing to compile."""
    if isinstance(schema, list):
        return [tuple_items_as_prefix_items(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else tuple_items_as_prefix_items(v) for k, v in schema.items()}
    if isinstance(out.get("items"), list) and "prefixItems" not in out:
        out["prefixItems"] = out.pop("items")
        if "additionalItems" in out:  # absent: further items are free, as 2020-12's absent "items"
            out["items"] = out.pop("additionalItems")
    return out


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar's C++ errors start with a time and a source location: "[12:35:34] /project/cpp/x.cc:94: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _first_line(exc: BaseException) -> str:
    text = _CPP_PREFIX.sub("", str(exc).strip()) or type(exc).__name__
    return text.splitlines()[0] if len(text) > 300 else text
