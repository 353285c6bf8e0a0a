"""Llama 3.x JSON tool calls: the whole output is the call(s).

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}

An output is read as calls only when it begins (after whitespace) with
<|python_tag|> or "{"; "arguments" is accepted for "parameters". Calls are
separated by ";". Any other output, and text after the last call, is content.
An object that is not a call ({"answer": 42}) is held back until it shows
it is not one, then sent as content.
"""

from __future__ import annotations

from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.call_stream import CallStream
from pagedllm.entrypoints.server.tool_parsers.incremental_json import WHITESPACE

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream()


class Llama3JsonStream(CallStream):
    def __init__(self):
        super().__init__()
        self._mode = "start"  # start, open (after the tag or a ";"), call, after (a call), text

    def _advance(self, final: bool) -> None:
        while True:
            buf = self._buf
            rest = buf.lstrip(WHITESPACE)
            if self._mode == "start":
                if rest.startswith(PYTHON_TAG):
                    self._begin(buf[: len(buf) - len(rest) + len(PYTHON_TAG)])
                    self._buf = rest[len(PYTHON_TAG):]
                    self._mode = "open"
                elif rest.startswith("{"):
                    self._begin(buf[: len(buf) - len(rest)])
                    self._buf = rest
                    self._mode = "call"
                elif not final and PYTHON_TAG.startswith(rest):  # also "": only whitespace so far
                    return
                else:
                    self._mode = "text"
            elif self._mode == "open":
                if not self._skip_whitespace():
                    if not final:
                        return
                    self._break()
                    self._mode = "text"
                else:
                    self._mode = "call"
            elif self._mode == "call":
                result = self._read_call(final)
                if result == "more":
                    return
                self._mode = "after" if result == "done" else "text"
            elif self._mode == "after":
                if rest.startswith(";"):
                    after = rest[1:].lstrip(WHITESPACE)
                    if not after:
                        if not final:
                            return
                        self._buf = ""  # a trailing ";": dropped
                        return
                    if after[0] == "{":
                        self._buf = rest[1:]
                        self._begin(";")
                        self._mode = "open"
                        continue
                elif not rest and not final:
                    return
                self._buf = rest
                self._mode = "text"
            else:
                self._rest_is_content(final)
                return
