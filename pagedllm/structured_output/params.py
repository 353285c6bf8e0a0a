"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some strings, or a grammar.

Names follow vLLM's StructuredOutputsParams, so code written for vLLM's
offline API passes its settings through unchanged. This module is plain
Python (the engine's bookkeeping imports it); compiling happens in the
engine core (backend.py), where a spec that does not compile ends its
request alone with the compiler's message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (a dict, its JSON text, or a pydantic model class)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF as GBNF writes it (root ::= ...), or Lark
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)
    disable_any_whitespace: bool = False  # JSON: no free whitespace between tokens (compact output)

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, (str, dict)):
            schema = getattr(self.json, "model_json_schema", None)  # a pydantic model class
            if not callable(schema):
                raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or its JSON text), got {_short(self.json)}")
            self.json = schema()
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {_short(parsed)}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {_short(value)}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got {_short(self.choice)}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {_short(self.json_object)}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be a bool, got {_short(self.disable_any_whitespace)}")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none was" if not given else f"{', '.join(given)} were"
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}; {what} given")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """Equal for specs that compile to the same grammar: the cache key of compiled grammars."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif kind == "choice":
            value = tuple(value)
        return (kind, value, self.disable_any_whitespace)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
