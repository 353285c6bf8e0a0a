"""One JSON value read a character at a time, rewritten in its canonical form as it goes.

Tool call arguments are sent to clients as json.dumps(arguments,
ensure_ascii=False), the same string whether the response streams or not.
To stream them, each part of that string is written as soon as it can no
longer change: a structural character at once, a string character once its
escape sequence is complete (a \\uD83D waits for its low surrogate), a number
or a literal once the character after it ends it (json.dumps rewrites 1.50 as
1.5 and 1e2 as 100.0). The pieces then join to exactly
json.dumps(json.loads(text), ensure_ascii=False).

What json.loads would accept and this refuses: NaN and Infinity (not JSON)
and duplicate keys (json.loads keeps the last value at the first key's place,
which a stream cannot write before the object ends).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")


class JsonSyntaxError(ValueError):
    """The text is not (the start of) one JSON value."""


@dataclass
class _Container:
    kind: str  # "{" or "["
    # object: first_key, key, colon, expect_value, value (inside one), after_value
    # array:  first_value, expect_value, value, after_value
    state: str
    keys: set[str] = field(default_factory=set)
    key: str | None = None


@dataclass
class IncrementalJson:
    """Push one character at a time; read the canonical pieces from `events`.

    events holds, in order:
      ("piece", key, text)  canonical text; key is the top-level object's key
                            whose value the text belongs to, None for the top
                            object's own braces, commas, keys and colons;
      ("start", key, char)  a top-level key's value begins with char;
      ("end", key)          a top-level key's value is complete.
    The caller drains events as it likes. done: the value is complete; the
    character that ends it is the last one pushed.
    """

    events: list = field(default_factory=list)
    done: bool = False
    _stack: list[_Container] = field(default_factory=list)
    _scalar: str | None = None  # "string", "key", "number", "literal" while one is being read
    _buf: str = ""  # a number's or literal's characters; an escape sequence's
    _escape: bool = False
    _key_chars: list[str] = field(default_factory=list)
    _high: str | None = None  # a \uD800-\uDBFF escape waiting for its low surrogate

    def push(self, ch: str) -> None:
        if self.done:
            raise JsonSyntaxError("the JSON value is already complete")
        if self._scalar in ("string", "key"):
            self._string_char(ch)
            return
        if self._scalar == "number":
            if ch in _NUMBER_CHARS:
                self._buf += ch
                return
            self._end_number()
        elif self._scalar == "literal":
            if ch.isalpha():
                self._buf += ch
                if not any(lit.startswith(self._buf) for lit in _LITERALS):
                    raise JsonSyntaxError(f"{self._buf!r} is not true, false or null")
                return
            self._end_literal()
        if ch in WHITESPACE:
            return
        if self.done:
            raise JsonSyntaxError(f"unexpected {ch!r} after the JSON value")
        self._structural(ch)

    # structure

    def _structural(self, ch: str) -> None:
        if not self._stack:
            self._value_start(ch)
            return
        top = self._stack[-1]
        state = top.state
        if top.kind == "{":
            if state in ("first_key", "key") and ch == '"':
                self._scalar, self._key_chars = "key", []
                self._emit('"')
            elif state == "first_key" and ch == "}" or state == "after_value" and ch == "}":
                self._close()
            elif state == "colon" and ch == ":":
                top.state = "expect_value"
                self._emit(": ")
            elif state == "expect_value":
                self._value_start(ch)
            elif state == "after_value" and ch == ",":
                top.state = "key"
                self._emit(", ")
            else:
                raise JsonSyntaxError(f"unexpected {ch!r} in an object")
        else:
            if state == "first_value" and ch == "]" or state == "after_value" and ch == "]":
                self._close()
            elif state in ("first_value", "expect_value"):
                self._value_start(ch)
            elif state == "after_value" and ch == ",":
                top.state = "expect_value"
                self._emit(", ")
            else:
                raise JsonSyntaxError(f"unexpected {ch!r} in an array")

    def _value_start(self, ch: str) -> None:
        if self._stack:
            parent = self._stack[-1]
            parent.state = "value"
            if len(self._stack) == 1 and parent.kind == "{":
                self.events.append(("start", parent.key, ch))
        if ch in "{[":
            self._stack.append(_Container(ch, "first_key" if ch == "{" else "first_value"))
            self._emit(ch)
        elif ch == '"':
            self._scalar = "string"
            self._emit('"')
        elif ch == "-" or ch.isdigit():
            self._scalar, self._buf = "number", ch
        elif ch in "tfn":
            self._scalar, self._buf = "literal", ch
        else:
            raise JsonSyntaxError(f"unexpected {ch!r} where a value should start")

    def _close(self) -> None:
        closing = "}" if self._stack.pop().kind == "{" else "]"
        self._emit(closing)
        self._value_done()

    def _value_done(self) -> None:
        if not self._stack:
            self.done = True
            return
        top = self._stack[-1]
        top.state = "after_value"
        if len(self._stack) == 1 and top.kind == "{":
            self.events.append(("end", top.key))

    def _emit(self, text: str) -> None:
        first = self._stack[0] if self._stack else None
        key = first.key if first is not None and first.kind == "{" and first.state == "value" else None
        self.events.append(("piece", key, text))

    # scalars

    def _end_number(self) -> None:
        self._scalar = None
        if not _NUMBER.fullmatch(self._buf):
            raise JsonSyntaxError(f"{self._buf!r} is not a JSON number")
        self._emit(json.dumps(json.loads(self._buf)))
        self._value_done()

    def _end_literal(self) -> None:
        self._scalar = None
        if self._buf not in _LITERALS:
            raise JsonSyntaxError(f"{self._buf!r} is not true, false or null")
        self._emit(self._buf)
        self._value_done()

    def _string_char(self, ch: str) -> None:
        if self._escape:
            self._buf += ch
            if len(self._buf) == 1:
                if ch in _SIMPLE_ESCAPES:
                    self._escape = False
                    self._decoded(_SIMPLE_ESCAPES[ch], from_u=False)
                elif ch != "u":
                    raise JsonSyntaxError(f"invalid escape \\{ch} in a string")
            elif ch not in _HEX:
                raise JsonSyntaxError(f"invalid escape \\{self._buf} in a string")
            elif len(self._buf) == 5:
                self._escape = False
                self._decoded(chr(int(self._buf[1:], 16)), from_u=True)
            return
        if ch == "\\":
            self._escape, self._buf = True, ""
        elif ch == '"':
            self._flush_high()
            self._end_string()
        elif ord(ch) < 0x20:
            raise JsonSyntaxError(f"control character {ch!r} inside a string (it must be escaped)")
        else:
            self._decoded(ch, from_u=False)

    def _decoded(self, ch: str, from_u: bool) -> None:
        """One decoded character; \\u escapes of a surrogate pair become one character, as json.loads does."""
        if self._high is not None:
            if from_u and "\udc00" <= ch <= "\udfff":
                ch = chr(0x10000 + ((ord(self._high) - 0xD800) << 10) + (ord(ch) - 0xDC00))
                self._high = None
            else:
                self._flush_high()
        if from_u and "\ud800" <= ch <= "\udbff":
            self._high = ch
            return
        self._write_char(ch)

    def _flush_high(self) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            self._write_char(high)

    def _write_char(self, ch: str) -> None:
        if self._scalar == "key":
            self._key_chars.append(ch)
        if ch in '"\\' or ord(ch) < 0x20:
            ch = json.dumps(ch)[1:-1]
        self._emit(ch)

    def _end_string(self) -> None:
        self._emit('"')
        if self._scalar == "key":
            self._scalar = None
            top = self._stack[-1]
            key = "".join(self._key_chars)
            if key in top.keys:
                raise JsonSyntaxError(f"duplicate key {key!r} in an object")
            top.keys.add(key)
            top.key, top.state = key, "colon"
        else:
            self._scalar = None
            self._value_done()
