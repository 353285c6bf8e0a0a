"""tools, tool_choice and parallel_tool_calls: what is refused (naming the field), and the plan for what is accepted."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.server.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    NamedFunctionParser,
    RequiredCallsParser,
    plan_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("tools,choice,parallel,words", [
    ("get_weather", None, None, "tools must be a list"),
    ([3], None, None, "tools[0] is 3"),
    ([{"type": "retrieval"}], None, None, "tools[0].type is 'retrieval'; only 'function'"),
    ([{"type": "function"}], None, None, "tools[0].function must be an object"),
    ([WEATHER, {"function": {"name": "bad name"}}], None, None, "tools[1].function.name is 'bad name'"),
    ([WEATHER, {"function": {"name": "x" * 65}}], None, None, "tools[1].function.name"),
    ([WEATHER, WEATHER], None, None, "tools[1].function.name 'get_weather' is already the name of tools[0]"),
    ([{"function": {"name": "f", "description": 3}}], None, None, "tools[0].function.description must be a string"),
    ([{"function": {"name": "f", "parameters": "x"}}], None, None, "tools[0].function.parameters must be a JSON schema"),
    ([{"function": {"name": "f", "parameters": {"type": "string"}}}], None, None, "parameters.type is 'string'"),
    ([{"function": {"name": "f", "strict": "yes"}}], None, None, "tools[0].function.strict must be true or false"),
    ([WEATHER], "sometimes", None, "tool_choice is 'sometimes'"),
    ([WEATHER], 3, None, "tool_choice is 3"),
    ([WEATHER], {"type": "function", "name": "get_weather"}, None, "tool_choice is {"),
    ([WEATHER], {"type": "function", "function": {"name": 3}}, None, "tool_choice.function.name must be a string"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "'nope' is not one of the tools (get_weather)"),
    (None, {"type": "function", "function": {"name": "nope"}}, None, "no tools were given"),
    (None, "required", None, "tool_choice is 'required' but no tools were given"),
    (None, "auto", None, "tool_choice is 'auto' but no tools were given"),
    ([WEATHER], "auto", "no", "parallel_tool_calls must be true or false"),
])
def test_refused(tools, choice, parallel, words):
    with pytest.raises(ValueError) as err:
        plan_tools(tools, choice, parallel)
    assert words in str(err.value)


def test_defaults_auto_with_tools_none_without():
    plan = plan_tools([WEATHER])
    assert (plan.choice, plan.json_schema, plan.parallel_tool_calls) == ("auto", None, True)
    assert isinstance(plan.parser(), HermesToolParser)
    assert plan.tools == [WEATHER]
    empty = plan_tools(None)
    assert (empty.choice, empty.tools, empty.parser()) == ("none", None, None)
    assert plan_tools([]).tools is None  # an empty list is no tools


def test_auto_uses_the_models_parser():
    plan = plan_tools([WEATHER], "auto", parser="llama3_json")
    assert plan.parser_name == "llama3_json" and isinstance(plan.parser(), Llama3JsonToolParser)
    with pytest.raises(ValueError, match="allowed: hermes, llama3_json, mistral"):
        plan_tools([WEATHER], parser="nope")


def test_none_still_shows_the_tools_to_the_template():
    plan = plan_tools([WEATHER], "none")
    assert plan.tools == [WEATHER] and plan.json_schema is None and plan.parser() is None


def test_missing_type_is_filled_in():
    assert plan_tools([{"function": {"name": "f"}}]).tools == [{"type": "function", "function": {"name": "f"}}]


def test_named_function_follows_its_parameters():
    plan = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert plan.choice == "function" and plan.function == "get_weather"
    assert plan.json_schema == WEATHER["function"]["parameters"]
    parser = plan.parser()
    assert isinstance(parser, NamedFunctionParser) and parser.extract('{"city": "Oslo"}').tool_calls[0].name == "get_weather"
    no_params = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert no_params.json_schema == {"type": "object", "properties": {}}


def test_required_is_a_list_of_calls_one_per_tool_schema():
    plan = plan_tools([WEATHER, TIME], "required")
    assert isinstance(plan.parser(), RequiredCallsParser)
    schema = plan.json_schema
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert plan_tools([WEATHER], "required", parallel_tool_calls=False).json_schema["maxItems"] == 1


def test_required_moves_defs_to_the_root():
    ref = {"type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}, "$defs": {"Unit": {"enum": ["C", "F"]}}}
    schema = plan_tools([{"function": {"name": "f", "parameters": ref}}], "required").json_schema
    assert schema["$defs"] == {"Unit": {"enum": ["C", "F"]}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    clash = {"type": "object", "$defs": {"Unit": {"type": "string"}}}
    with pytest.raises(ValueError, match="define \\$defs 'Unit' differently"):
        plan_tools([{"function": {"name": "f", "parameters": ref}}, {"function": {"name": "g", "parameters": clash}}], "required")
