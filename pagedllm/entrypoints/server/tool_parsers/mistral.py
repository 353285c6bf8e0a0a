"""Mistral tool calls, after the [TOOL_CALLS] token.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}     (tokenizer v11 and later)

A single object after [TOOL_CALLS] is read too. Text before the token, and
after the calls, is content. [TOOL_CALLS] and [ARGS] are special tokens, so
the output must be detokenized with them (needs_special_tokens).
"""

from __future__ import annotations

import re

from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.call_stream import CallStream

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralToolParser(ToolParser):
    needs_special_tokens = True

    def stream(self) -> MistralStream:
        return MistralStream()


class MistralStream(CallStream):
    def __init__(self):
        super().__init__()
        self._mode = "text"  # text, marker (after [TOOL_CALLS]), list, call, name, args
        self._name = ""

    def _advance(self, final: bool) -> None:
        while True:
            if self._mode == "text":
                if self._text_until((TOOL_CALLS,), final) is None:
                    return
                self._mode = "marker"
            if self._mode == "marker":
                if not self._skip_whitespace():
                    if not final:
                        return
                    self._break()
                    self._mode = "text"
                    continue
                first = self._buf[0]
                if first == "[":
                    self._consume(1)
                    self._list_state = "first"
                    self._mode = "list"
                elif first == "{":
                    self._mode = "call"
                elif _NAME.match(first).end():
                    self._name = ""
                    self._mode = "name"
                else:
                    self._break()
                    self._mode = "text"
                    continue
            if self._mode == "name":
                n = _NAME.match(self._buf).end()
                self._name += self._buf[:n]
                self._consume(n)
                if self._buf.startswith(ARGS):
                    self._consume(len(ARGS))
                    self._mode = "args"
                elif not final and ARGS.startswith(self._buf):  # also "": the name may go on
                    return
                else:
                    self._break()
                    self._mode = "text"
                    continue
            if self._mode == "list":
                result = self._read_call_list(final)
            else:  # call, args
                result = self._read_call(final, self._name if self._mode == "args" else None)
            if result == "more":
                return
            self._mode = "text"
