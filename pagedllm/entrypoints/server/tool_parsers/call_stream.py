"""The bookkeeping every format's stream shares: held-back text, call attempts, deltas.

A format's stream is a small state machine over the text not yet consumed
(_buf); its _advance() consumes what it can and calls the helpers here:

- _text_until(markers): content up to the first marker, holding back only a
  possible marker start and the whitespace before it;
- an attempt: a call that has begun (its marker seen), with the raw text it
  has consumed. _read_call() feeds the call's JSON to a CallReader and sends
  its deltas; if the JSON breaks, or the output ends inside it, _break() sends
  the raw text as content instead (see base.py for what that means for a
  call already announced);
- _read_call_list(): a JSON list of call objects ([{...}, {...}]).

Whitespace before a call and between calls is not content, nor is whitespace
after a call, unless content comes both before and after that call: then it
separates the two ("Before <call> after" has the content "Before after").
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

from pagedllm.entrypoints.server.tool_parsers.base import StreamDelta, ToolCall, ToolCallDelta, ToolCallStream, make_call_id
from pagedllm.entrypoints.server.tool_parsers.call_reader import CallReader
from pagedllm.entrypoints.server.tool_parsers.incremental_json import WHITESPACE, JsonSyntaxError


def hold_length(text: str, markers: tuple[str, ...]) -> int:
    """How much of text's end could still begin a marker: a marker's proper prefix, and the whitespace before it."""
    keep = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), keep, -1):
            if text.endswith(marker[:n]):
                keep = n
                break
    rest = text[: len(text) - keep]
    return len(text) - len(rest.rstrip(WHITESPACE))


@dataclass
class _Attempt:
    raw: list[str]  # the text consumed since the call began: whitespace before it, its marker, its JSON
    reader: CallReader | None = None
    index: int | None = None  # set when the call is announced
    id: str | None = None
    arguments: list[str] = field(default_factory=list)


class CallStream(ToolCallStream):
    def __init__(self):
        self._buf = ""
        self._content_out: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._calls: list[ToolCall] = []
        self._announced = 0
        self._attempt: _Attempt | None = None
        self._after_call = False  # nothing but whitespace since the last call ended
        self._sent_content = False
        self._list_state = "first"
        self._finished = False

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Consume what can be consumed of _buf; at final, all of it."""

    def feed(self, delta_text: str) -> StreamDelta | None:
        if self._finished:
            raise ValueError("feed() after finish(): this stream has ended")
        self._buf += delta_text
        self._advance(final=False)
        return self._take()

    def finish(self) -> StreamDelta | None:
        if self._finished:
            raise ValueError("finish() was already called on this stream")
        self._advance(final=True)
        self._finished = True
        assert not self._buf and self._attempt is None, (self._buf, self._attempt)
        return self._take()

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _take(self) -> StreamDelta | None:
        content = "".join(self._content_out)
        deltas, self._content_out, self._deltas = self._deltas, [], []
        if not content and not deltas:
            return None
        return StreamDelta(content or None, deltas)

    # content

    def _content(self, text: str) -> None:
        """Send content. Mid-stream it never ends in whitespace (that is held back), so whitespace alone
        after a call is the output's end, dropped; before text it separates that text from earlier content."""
        if self._after_call:
            stripped = text.lstrip(WHITESPACE)
            if not stripped:
                return
            if not self._sent_content:
                text = stripped
            self._after_call = False
        if text:
            self._content_out.append(text)
            self._sent_content = True

    def _text_until(self, markers: tuple[str, ...], final: bool) -> str | None:
        """Send content up to the first marker; return that marker (consumed, an attempt begun), or None."""
        buf = self._buf
        found = min(((buf.find(m), m) for m in markers if m in buf), default=None)
        if found is None:
            keep = 0 if final else hold_length(buf, markers)
            self._content(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return None
        at, marker = found
        start = len(buf[:at].rstrip(WHITESPACE))
        self._content(buf[:start])
        self._begin(buf[start: at + len(marker)])
        self._buf = buf[at + len(marker):]
        return marker

    def _rest_is_content(self, final: bool) -> None:
        """No call can follow: all of _buf is content (but trailing whitespace, until the end)."""
        keep = 0 if final else len(self._buf) - len(self._buf.rstrip(WHITESPACE))
        self._content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]

    # attempts

    def _begin(self, raw: str = "") -> None:
        assert self._attempt is None
        self._attempt = _Attempt([raw])

    def _consume(self, n: int) -> None:
        """Move the next n characters into the attempt's raw text."""
        self._attempt.raw.append(self._buf[:n])
        self._buf = self._buf[n:]

    def _skip_whitespace(self) -> bool:
        """Leading whitespace into the attempt's raw text; True if any text is left."""
        self._consume(len(self._buf) - len(self._buf.lstrip(WHITESPACE)))
        return bool(self._buf)

    def _break(self) -> None:
        """Not a call after all: its text is content."""
        attempt, self._attempt = self._attempt, None
        self._content("".join(attempt.raw))

    def _read_call(self, final: bool, name: str | None = None) -> str:
        """Feed the attempt's JSON (a call object, or the arguments of the named function): "done", "broken" or "more"."""
        attempt = self._attempt
        if attempt.reader is None:
            attempt.reader = CallReader(name)
        reader, buf, i = attempt.reader, self._buf, 0
        try:
            while i < len(buf) and not reader.done:
                reader.push(buf[i])
                i += 1
        except JsonSyntaxError:
            self._consume(i)
            self._break()
            return "broken"
        self._consume(i)
        if reader.header_ready:
            self._announce(attempt)
        if reader.done:
            self._calls.append(ToolCall(attempt.id, reader.name, "".join(attempt.arguments)))
            self._attempt = None
            self._after_call = True
            return "done"
        if final:  # cut off, by max_tokens or a stop string
            self._break()
            return "broken"
        return "more"

    def _announce(self, attempt: _Attempt) -> None:
        fragment = attempt.reader.take_arguments()
        attempt.arguments.append(fragment)
        if attempt.index is None:
            attempt.index, attempt.id = self._announced, make_call_id()
            self._announced += 1
            self._deltas.append(ToolCallDelta(attempt.index, attempt.id, attempt.reader.name, fragment))
        elif fragment:
            last = self._deltas[-1] if self._deltas else None
            if last is not None and last.index == attempt.index:
                last.arguments += fragment
            else:
                self._deltas.append(ToolCallDelta(attempt.index, None, None, fragment))

    def _read_call_list(self, final: bool) -> str:
        """The items of a list of call objects, its "[" already consumed: "end", "broken" or "more".

        Set _list_state = "first" when the list begins. A list that ends
        early (text after an item instead of "," or "]", or the output's end)
        ends there; an item that breaks ends the list, its text content.
        """
        while True:
            if self._list_state in ("first", "item"):
                if not self._skip_whitespace():
                    if final:
                        self._break()
                        return "broken"
                    return "more"
                if self._buf[0] != "{":
                    self._break()
                    return "broken"
                self._list_state = "in_item"
            if self._list_state == "in_item":
                result = self._read_call(final)
                if result != "done":
                    return result
                self._list_state = "after_item"
            rest = self._buf.lstrip(WHITESPACE)
            if not rest:
                return "end" if final else "more"
            if rest[0] not in ",]":
                return "end"
            self._buf = rest[1:]
            if rest[0] == "]":
                return "end"
            self._begin(",")
            self._list_state = "item"
