"""Request bodies whose strings are not valid Unicode get a 400 naming the field.

JSON may spell a UTF-16 surrogate on its own ("\\ud800"), and Python's json
module turns it into a str that holds it; the tokenizer and the UTF-8 encoder
of every response then fail on it, as a 500. Only a body that spells a
surrogate escape at all is parsed again and walked (a valid pair, an emoji sent
by an ASCII-only encoder, passes), so other bodies cost one byte search.
"""

from __future__ import annotations

import json
import re

from pagedllm.entrypoints.server.errors import bad_request

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_unicode(body: bytes) -> None:
    """Raise a 400 APIError if a string of the JSON body (a key or a value) holds a lone surrogate."""
    if b"\\u" not in body or not _SURROGATE_ESCAPE.search(body):
        return
    try:
        doc = json.loads(body)
    except ValueError:
        return  # malformed JSON: the body's own parsing reports it
    found = _lone_surrogate(doc, "")
    if found is not None:
        path, index, char = found
        raise bad_request(f"{path or 'the request body'} holds a lone UTF-16 surrogate (\\u{ord(char):04x}) at character "
                          f"{index}: strings must be valid Unicode (a surrogate only in a high-low pair)",
                          path.split(".", 1)[0].split("[", 1)[0] or None)


def _lone_surrogate(value, path: str) -> tuple[str, int, str] | None:
    """(the field's path, the character's index, the character) of the first lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, exc.start, value[exc.start]
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None
