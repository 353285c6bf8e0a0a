"""Hermes-style tool calls (Hermes 2/3, Qwen 2.5, Qwen3, and the prompt pagedllm adds for templates without tools).

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    ...

Text outside the tags is content. A closing tag may be missing at the end of
the output; a call whose JSON breaks, or is cut off, stays in the content.
"""

from __future__ import annotations

from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.call_stream import CallStream
from pagedllm.entrypoints.server.tool_parsers.incremental_json import WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    def stream(self) -> HermesStream:
        return HermesStream()


class HermesStream(CallStream):
    def __init__(self):
        super().__init__()
        self._mode = "text"  # text, open (after <tool_call>), call, close (after the JSON)

    def _advance(self, final: bool) -> None:
        while True:
            if self._mode == "text":
                if self._text_until((OPEN,), final) is None:
                    return
                self._mode = "open"
            if self._mode == "open":
                if not self._skip_whitespace():
                    if not final:
                        return
                    self._break()
                    self._mode = "text"
                    continue
                self._mode = "call"
            if self._mode == "call":
                result = self._read_call(final)
                if result == "more":
                    return
                self._mode = "close" if result == "done" else "text"
                continue
            # close: whitespace, then </tool_call> if it is there
            rest = self._buf.lstrip(WHITESPACE)
            if rest.startswith(CLOSE):
                self._buf = rest[len(CLOSE):]
            elif CLOSE.startswith(rest):  # also "": whitespace so far
                if not final:
                    return
                self._buf = ""  # a closing tag cut short: dropped with the call it closes
            self._mode = "text"
