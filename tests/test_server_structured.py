"""Structured outputs and tool calls through the HTTP API, with the openai package as the client.

The tiny random-weight model writes nonsense: whatever comes out valid, the
grammar made valid. The default model's run of 20 schemas is benchmarks/structured_outputs.py.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from pagedllm import LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

pytest.importorskip("xgrammar")

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=20)
    name: str = Field(max_length=5)
    tags: list[Literal["x", "y"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))
    with BackgroundServer(build_app(engine, [MODEL])) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def test_parse_with_a_pydantic_model_returns_the_object(client):
    r = client.beta.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A pet"}], response_format=Pet,
                                           max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Pet)


def test_json_object_regex_choice_and_grammar_constrain_every_output(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=60, n=3,
                                       temperature=1.0, seed=3, response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:  # cut by max_tokens: a prefix of a JSON object, and the finish reason says so
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, n=4, temperature=1.0, seed=1,
                                  extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert all(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, n=4, temperature=1.0, seed=2,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert {c.text for c in r.choices} <= {"alpha", "beta", "gamma"}
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=10, temperature=0,
                                  extra_body={"guided_grammar": 'root ::= "id-" [0-9] [0-9]'})
    assert re.fullmatch(r"id-[0-9]{2}", r.choices[0].text)


def test_llama_cpp_names_constrain_the_output(client):
    """llama.cpp's server's fields: json_schema and grammar at the top, a schema inside a json_object response_format."""
    msgs = [{"role": "user", "content": "An example"}]
    for extra in ({"json_schema": {"const": "42"}}, {"response_format": {"type": "json_object", "schema": {"const": "42"}}}):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, extra_body=extra)
        assert r.choices[0].message.content == '"42"'
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"grammar": 'root ::= "a"{5,5}'})
    assert r.choices[0].message.content == "aaaaa"
    for bad in ({"type": "json_object", "schema": 123}, {"type": "json_object", "schema": {"type": "hiccup"}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, response_format=bad)


def test_streamed_structured_output_equals_the_whole_answer(client):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "A pet"}], max_tokens=200, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}})
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**body, stream=True) if ch.choices)
    assert streamed == whole
    Pet.model_validate_json(whole)


def test_bad_specs_are_400s_that_name_the_field(client):
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
              extra_body={"guided_regex": "a"}), "give only one"),
        (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "exactly one of"),
        (dict(extra_body={"guided_decoding_backend": "outlines"}), "xgrammar"),
        (dict(extra_body={"structured_outputs": {"whitespace_pattern": " "}}), "not supported"),
    ]
    for kw, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
        assert words in info.value.body["message"]


def test_a_spec_that_does_not_compile_is_a_400_for_that_request_only(client):
    # The engine compiles the grammar after accepting the request; a spec that does not compile is still the
    # client's mistake (vLLM answers 400 too), for a JSON schema, a regex or an EBNF grammar, whole or streamed.
    for so in ({"regex": "(unclosed"}, {"json": {"type": "object", "properties": {"a": "not a schema"}}},
               {"grammar": 'root ::= undefined_rule'}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"structured_outputs": so})
        assert "could not be compiled" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, stream=True,
                                                extra_body={"guided_regex": "(unclosed"}):
            pass
    assert "could not be compiled" in str(info.value)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].finish_reason == "length"


def _streamed_calls(client, **kw) -> tuple[str, dict, str]:
    content, calls, reason = "", {}, None
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None and tc.type == "function"  # id, type and name come once, first
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        reason = ch.choices[0].finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("choice,reason", [
    ("required", "tool_calls"),
    ({"type": "function", "function": {"name": "get_time"}}, "stop"),
])
def test_forced_tool_calls_are_valid_and_streamed_deltas_equal_the_whole_answer(client, choice, reason):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == reason
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_time"]
    for c in calls:
        args = json.loads(c.function.arguments)
        required = (WEATHER if c.function.name == "get_weather" else TIME)["function"]["parameters"]["required"]
        assert set(required) <= set(args)
    content, streamed, stream_reason = _streamed_calls(client, **kw)
    assert stream_reason == reason and not content
    assert [(s["name"], s["arguments"]) for s in streamed.values()] == [(c.function.name, c.function.arguments) for c in calls]


def test_parallel_tool_calls_false_gives_one_call_and_the_loop_goes_on(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    final = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER, TIME], max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_without_a_call_is_plain_content(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=10,
                                       temperature=0)
    msg = r.choices[0].message
    # The random model does not write <tool_call>: everything it wrote is content, nothing is lost.
    assert msg.tool_calls is None and msg.content
    assert client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=5).choices[0].message.tool_calls is None


def test_bad_tools_are_400s(client):
    cases = [
        (dict(tools=[{"type": "function"}]), "tools"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
        assert info.value.body["param"] == param, info.value.body


def test_logit_bias_and_allowed_token_ids_over_http(client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logit_bias={"1234": 100})
    r_ids = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logit_bias={"1234": 100},
                                      extra_body={"return_token_ids": True})
    assert r_ids.choices[0].model_extra["token_ids"] == [1234] * 4 and r.choices[0].text == r_ids.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0,
                                  extra_body={"allowed_token_ids": [40, 41], "return_token_ids": True})
    assert set(r.choices[0].model_extra["token_ids"]) <= {40, 41}
