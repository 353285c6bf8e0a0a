"""Errors in OpenAI's shape, and the handlers that make every failure one.

Clients written for OpenAI read `{"error": {"message", "type", "param",
"code"}}`; whatever goes wrong (a bad field, malformed JSON, a wrong key, an
unknown route, a bug) answers in that shape with a fitting status, and the
server carries on with everyone else.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.async_engine import EngineDeadError
from pagedllm.sampling_params import NothingToSample

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


class APIError(Exception):
    """A failure to report to the client: status, message, and which request field caused it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def generation_failed(error: str | None) -> APIError:
    """The error for a request the engine ended with finish_reason "error".

    A grammar that does not compile (an invalid JSON schema, regex or EBNF) is
    found by the engine when it compiles it, after the request was accepted:
    that is the client's mistake, a 400 as for any other invalid field; so are
    constraints that leave no token to sample. The rest are the server's, a 500.
    """
    kind, _, message = (error or "").partition(": ")
    if (kind == "ValueError" and "could not be compiled" in message) or (
            kind == "NothingToSample" and message.startswith(NothingToSample.MASKED)):
        return bad_request(message)
    return APIError(500, f"generation failed: {error}", code="internal_error")


def from_value_error(exc: ValueError, fields: set[str], renames: dict[str, str] | None = None) -> APIError:
    """A 400 from a ValueError raised by SamplingParams or the engine's checks.

    Their messages start with the parameter's name ("temperature must be ...");
    when that name is a request field it becomes the error's param.
    """
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":,").split("[", 1)[0].split(".", 1)[0]  # logit_bias['5'], structured_outputs.json
    renames = renames or {}
    param = renames.get(first, first if first in fields else None)
    if param is not None and first in renames:
        message = param + message[len(first):]
    return bad_request(message, param)


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's complaint about the first bad field, phrased as `field: what is wrong (got value)`."""
    errors = exc.errors()
    if not errors:
        return bad_request("the request body is not valid")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    loc = _field_path(err)
    param = ".".join(loc) or None
    if err.get("type") == "missing":
        return bad_request(f"{param} is required", param, code="missing_required_parameter")
    if param is None:
        return bad_request(f"the request body must be a JSON object: {err.get('msg')}", code="invalid_type")
    # A union type fails once per member ("a valid string", "a valid list"): say them together.
    msgs = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors if _field_path(e) == loc))
    got = err.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
    lead = "Input should be "
    if len(msgs) > 1 and all(m.startswith(lead) for m in msgs):
        msgs = [lead + " or ".join(m[len(lead):] for m in msgs)]
    return bad_request(f"{param}: {' or '.join(msgs)} (got {shown})", param, code="invalid_type")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _field_path(err: dict) -> list[str]:
    """The error's location as field names and indexes, less the body and the union-member tags pydantic adds."""
    return [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        level = logging.INFO if exc.status < 500 else logging.ERROR
        logger.log(level, "%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        elif status == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail) or HTTPStatus(status).phrase
        return await _api_error(request, APIError(status, message, code=HTTPStatus(status).phrase.lower().replace(" ", "_")))

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return await _api_error(request, APIError(503, str(exc), code="engine_unavailable"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()
