"""What a tool parser gives back, and the contract every parser keeps.

A parser reads a model's output and separates the text meant for the user
(content) from the tool calls. extract() reads a whole output; stream()
returns a ToolCallStream that reads it a step at a time. Over a whole stream:

(a) the content deltas join to extract()'s content ("" where it is None);
(b) each call of extract() is streamed under one index: its first delta
    carries id and name, the later ones argument fragments, and the fragments
    join to exactly extract()'s arguments, json.dumps(arguments,
    ensure_ascii=False), so streamed and whole responses agree byte for byte.

Text is held back only while it could still be the start of a call (a
partial "<tool_ca", and the whitespace before it, since whitespace before a
call is not content; see call_stream.py for the whitespace rules). A call whose JSON is invalid or cut off (by
max_tokens) is not a call: its text stays in the content, as in vLLM. In a
stream such a call is only known to be broken at the point where it breaks;
the deltas sent before that point are sent once the call's name and the start
of its arguments are known, and cannot be taken back. For that one case the
stream has a last call that extract() does not have; (a) holds all the same,
since the broken call's text is streamed as content too.

The same machinery reads both ways (extract() runs a stream over the whole
text), so the two cannot disagree.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


def make_call_id() -> str:
    """A tool call id as OpenAI writes them: call_ and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's arguments field)


@dataclass
class ExtractedToolCalls:
    content: str | None  # None when the output was only tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    index: int  # the call's place among this output's calls
    id: str | None  # set on a call's first delta only
    name: str | None  # likewise
    arguments: str  # the next fragment of the arguments text ("" on a first delta that has none yet)


@dataclass
class StreamDelta:
    content: str | None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallStream(ABC):
    """Reads one output a step at a time."""

    @abstractmethod
    def feed(self, delta_text: str) -> StreamDelta | None:
        """The new text of one step; None when there is nothing to send yet."""

    @abstractmethod
    def finish(self) -> StreamDelta | None:
        """The end of the output: text held back, or the text of a call that was cut off, as content."""

    @property
    @abstractmethod
    def tool_calls(self) -> list[ToolCall]:
        """The calls read whole so far (for the finish reason "tool_calls", and extract())."""


class ToolParser(ABC):
    """One model family's tool call format."""

    # The markers are special tokens that a detokenizer skips by default
    # (Mistral's [TOOL_CALLS]): detokenize with skip_special_tokens=False.
    needs_special_tokens: bool = False

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """A new stream, for one output."""

    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and the calls of a whole output."""
        stream = self.stream()
        deltas = [stream.feed(text), stream.finish()]
        content = "".join(d.content for d in deltas if d is not None and d.content)
        calls = stream.tool_calls
        return ExtractedToolCalls(content if content or not calls else None, calls)
