"""Cross-origin requests from web pages: which origins may call the API from a browser.

A browser lets a page call another origin's API only if that API says so
(CORS); without it, a page on any site a user visits could drive a server
the user runs on localhost. By default only local pages may
(http://localhost:*, http://127.0.0.1:*, http://[::1]:*), as llama.cpp's
server allows; --allowed-origins widens that ('["*"]' for any). The flags are
named as vLLM names them and take a JSON list, as vLLM's do, or a comma list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

# Any port of a local host, over http or https.
LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?$"


@dataclass(frozen=True)
class CorsSettings:
    allowed_origins: list[str] | None = None  # None: local pages only
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def add_cors(app: FastAPI, settings: CorsSettings | None) -> None:
    """Answer preflight OPTIONS requests and mark allowed responses; other origins get no CORS headers."""
    settings = settings or CorsSettings()
    origins = settings.allowed_origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins or [],
        allow_origin_regex=LOCAL_ORIGINS if origins is None else None,
        allow_methods=settings.allowed_methods,
        allow_headers=settings.allowed_headers,
        allow_credentials=settings.allow_credentials,
    )


def parse_list(text: str) -> list[str]:
    """A flag's list: JSON ('["http://a.example", "http://b.example"]', as vLLM takes it) or comma-separated."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON list of strings: {text!r} ({exc})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"not a JSON list of strings: {text!r}")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]
