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
from pagedllm.tokenizer import check_text

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_unicode(body: bytes) -> None:
    """Raise a 400 APIError if a string of the JSON body (a key or a value) holds a lone surrogate."""
    if b"\\u" not in body or not _SURROGATE_ESCAPE.search(body):
        return
    try:
        doc = json.loads(body)
    except ValueError:
        return  # malformed JSON: the body's own parsing reports it
    _check_strings(doc, "")


def _check_strings(value, path: str) -> None:
    """Every string of a parsed JSON document, keys included, through check_text, as a 400 naming its field."""
    if isinstance(value, str):
        try:
            check_text(path or "the request body", value)
        except ValueError as exc:
            raise bad_request(str(exc), path.split(".", 1)[0].split("[", 1)[0] or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path)
            _check_strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}[{i}]")
