"""/openapi.json as the server really answers: OpenAI's error shape for every failure, no 422s.

FastAPI documents a 422 with its own validation-error body on every route
that takes a body; this server answers bad input with a 400 in OpenAI's
shape instead (errors.py). A client generated from the document would
otherwise expect errors that never come and miss the ones that do. So each
route lists the statuses it can answer with, each with the ErrorResponse
schema, and FastAPI's 422 and its schemas are taken out.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pagedllm.entrypoints.server.protocol import ErrorResponse

_WHY = {
    400: "The request is not valid: the message says which field and what is allowed (param names the field).",
    401: "No API key, or a wrong one: send 'Authorization: Bearer <key>'.",
    404: "The model (or route) does not exist on this server.",
    500: "An internal error while answering this request.",
    503: "The engine is not running (starting, shutting down, or failed).",
}


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses=` entries for these statuses, each with OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


def install_openapi(app: FastAPI) -> None:
    """Have app.openapi() drop FastAPI's 422 responses and validation-error schemas."""

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in doc.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema
