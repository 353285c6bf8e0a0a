"""One tool call's JSON, read a character at a time: its name, and its arguments as they become final.

Two shapes:
- a call object, {"name": "f", "arguments": {...}} ("parameters" is taken
  for "arguments", as Llama 3 writes it; other keys are read and ignored);
- an arguments object alone, when the name is known from elsewhere (a
  function named by tool_choice, Mistral's name[ARGS]{...}).

The call is announced (header_ready) only once its name is known and its
arguments object has begun, so that an object that merely looks like JSON
({"name": "Bob", "age": 3}) is never streamed as a call.
"""

from __future__ import annotations

import json

from pagedllm.entrypoints.server.tool_parsers.incremental_json import WHITESPACE, IncrementalJson, JsonSyntaxError

ARGUMENT_KEYS = ("arguments", "parameters")


class CallReader:
    """push() characters until done; JsonSyntaxError when the text is not a tool call."""

    def __init__(self, name: str | None = None):
        self._json = IncrementalJson()
        self._named = name is not None
        self.name = name
        self._name_pieces: list[str] = []
        self._args_key: str | None = None
        self._args: list[str] = []
        self._args_taken = 0  # how many of _args take_arguments() has handed out
        self.args_started = False
        self.done = False
        self._started = False

    @property
    def header_ready(self) -> bool:
        return self.name is not None and self.args_started

    def push(self, ch: str) -> None:
        if not self._started:
            if ch in WHITESPACE:
                return
            if ch != "{":
                raise JsonSyntaxError(f"a tool call is a JSON object; it cannot start with {ch!r}")
            self._started = True
        self._json.push(ch)
        events, self._json.events = self._json.events, []
        for event in events:
            self._on(event)
        if self._json.done:
            if self.name is None or not self.args_started:
                raise JsonSyntaxError('a tool call needs a "name" (a string) and "arguments" (an object)')
            self.done = True

    def take_arguments(self) -> str:
        """The canonical argument text that has become final since the last call."""
        text = "".join(self._args[self._args_taken:])
        self._args_taken = len(self._args)
        return text

    def _on(self, event: tuple) -> None:
        kind, key = event[0], event[1]
        if self._named:
            if kind == "piece":
                self.args_started = True
                self._args.append(event[2])
            return
        if kind == "piece":
            if key == "name":
                self._name_pieces.append(event[2])
            elif key is not None and key == self._args_key:
                self._args.append(event[2])
        elif kind == "start":
            if key == "name" and event[2] != '"':
                raise JsonSyntaxError('a tool call\'s "name" must be a string')
            if key in ARGUMENT_KEYS and self._args_key is None:
                if event[2] != "{":
                    raise JsonSyntaxError(f'a tool call\'s "{key}" must be a JSON object')
                self._args_key = key
                self.args_started = True
        elif kind == "end" and key == "name":
            name = json.loads("".join(self._name_pieces))
            if not name:
                raise JsonSyntaxError('a tool call\'s "name" is empty')
            self.name = name
