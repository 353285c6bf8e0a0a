"""The many ways an HTTP request asks for structured output, read into one StructuredOutputsParams.

OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` object and its older `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` fields, and llama.cpp's server's
`json_schema` and `grammar` fields (and its `schema` inside a json_object
response_format) all mean the same thing to the engine. A request may use one of them; two at once is a 400, as is any
option of theirs this server does not honour (nothing is silently ignored).
"""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.server.errors import bad_request
from pagedllm.structured_output.params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "json_schema": "json", "grammar": "grammar"}  # the last two: llama.cpp's names
_SO_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")
# vLLM's options this server does not have (other grammar backends' settings).
_SO_UNSUPPORTED = ("structural_tag", "whitespace_pattern", "disable_fallback", "disable_additional_properties")
_BACKENDS = ("auto", "xgrammar")


def structured_outputs_of(body: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's spec and the field it came from (for error messages), or (None, None)."""
    found: list[tuple[str, dict]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        found.append(("structured_outputs", _structured_outputs_field(so)))
    for name, kind in _GUIDED.items():
        value = getattr(body, name, None)
        if value is not None:
            found.append((name, {kind: value}))
    if getattr(body, "guided_whitespace_pattern", None) is not None:
        raise bad_request("guided_whitespace_pattern is not supported by this server (xgrammar allows any JSON whitespace; "
                          "structured_outputs.disable_any_whitespace allows none)", "guided_whitespace_pattern", "unsupported_parameter")
    backend = getattr(body, "guided_decoding_backend", None)
    if backend is not None and backend not in _BACKENDS:
        raise bad_request(f"guided_decoding_backend {backend!r} is not available: this server uses xgrammar "
                          f"(allowed: {', '.join(_BACKENDS)})", "guided_decoding_backend", "unsupported_parameter")
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_request(f"{' and '.join(n for n, _ in found)} each ask for structured output: give only one", found[1][0])
    field, spec = found[0]
    try:
        return StructuredOutputsParams(**spec), field
    except ValueError as exc:
        raise bad_request(f"{field}: {exc}", field) from None


def _response_format(rf: Any) -> dict | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_request('response_format must be an object with a "type": text, json_object or json_schema', "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        if "schema" not in rf:
            return {"json_object": True}
        return {"json": _schema(rf["schema"], "response_format.schema")}  # llama.cpp's server reads a schema here
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}', "response_format")
        schema = js.get("schema")
        if schema is None:  # OpenAI allows leaving the schema out: any JSON object
            return {"json_object": True}
        return {"json": _schema(schema, "response_format.json_schema.schema")}
    raise bad_request(f"response_format type {kind!r} is not supported: allowed types are text, json_object, json_schema",
                      "response_format", "unsupported_parameter")


def _schema(schema: Any, where: str) -> dict:
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema object, got {type(schema).__name__}", "response_format")
    return schema


def _structured_outputs_field(so: Any) -> dict:
    if not isinstance(so, dict):
        raise bad_request("structured_outputs must be an object with one of: json, regex, choice, grammar, json_object",
                          "structured_outputs")
    for key in so:
        if key in _SO_UNSUPPORTED:
            raise bad_request(f"structured_outputs.{key} is not supported by this server", "structured_outputs",
                              "unsupported_parameter")
        if key not in _SO_KEYS:
            raise bad_request(f"structured_outputs.{key} is not a known option; allowed: {', '.join(_SO_KEYS)}",
                              "structured_outputs")
    return {k: v for k, v in so.items() if v is not None}
