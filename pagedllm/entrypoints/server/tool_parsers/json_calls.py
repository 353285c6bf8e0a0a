"""The two forced formats: the output made under a JSON-schema grammar when tool_choice forces a call.

- a named function (tool_choice {"type": "function", "function": {"name": f}}):
  the output IS the arguments object; one call, named f;
- tool_choice "required": the output is a list of calls,
  [{"name": "f", "parameters": {...}}, ...] (vLLM's convention).

The grammar makes the JSON valid; a list or object cut off by max_tokens is
still read as far as it goes: whole calls are calls, the broken rest content.
Text around the JSON (whitespace aside) is content.
"""

from __future__ import annotations

from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.call_stream import CallStream
from pagedllm.entrypoints.server.tool_parsers.incremental_json import WHITESPACE


class NamedFunctionParser(ToolParser):
    def __init__(self, name: str):
        if not name:
            raise ValueError("NamedFunctionParser needs the function's name")
        self.name = name

    def stream(self) -> _ForcedStream:
        return _ForcedStream("{", self.name)


class RequiredCallsParser(ToolParser):
    def stream(self) -> _ForcedStream:
        return _ForcedStream("[", None)


class _ForcedStream(CallStream):
    def __init__(self, opening: str, name: str | None):
        super().__init__()
        self._opening, self._name = opening, name
        self._mode = "start"  # start, json, text

    def _advance(self, final: bool) -> None:
        if self._mode == "start":
            rest = self._buf.lstrip(WHITESPACE)
            if not rest and not final:
                return
            if rest.startswith(self._opening):
                self._begin(self._buf[: len(self._buf) - len(rest)])
                self._buf = rest
                if self._opening == "[":
                    self._consume(1)
                    self._list_state = "first"
                self._mode = "json"
            else:
                self._mode = "text"
        if self._mode == "json":
            if self._opening == "[":
                result = self._read_call_list(final)
            else:
                result = self._read_call(final, self._name)
            if result == "more":
                return
            self._mode = "text"
        self._rest_is_content(final)
