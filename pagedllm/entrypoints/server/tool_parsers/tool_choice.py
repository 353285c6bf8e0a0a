"""A chat request's tools, tool_choice and parallel_tool_calls, turned into a plan for serving it.

The plan says what the chat template gets, which JSON schema (if any) the
output must follow, and which parser reads the output:

- "none": the model is not to call; the tools still go to the template (vLLM's
  default, without --exclude-tools-when-tool-choice-none) and the output is
  all content;
- "auto" (the default when tools are given): the model may call, in its own
  format, read by the model's parser (choose_tool_parser);
- "required": the output is a JSON list of calls, [{"name", "parameters"}],
  at least one (at most one when parallel_tool_calls is false), under a
  grammar; read by RequiredCallsParser;
- {"type": "function", "function": {"name": f}}: the output is f's arguments
  object, under f's parameters schema; read by NamedFunctionParser.

parallel_tool_calls false in "auto" cannot be enforced by a grammar: the
server keeps the first call only (deltas with index 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.chat import check_tools
from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.json_calls import NamedFunctionParser, RequiredCallsParser
from pagedllm.entrypoints.server.tool_parsers.registry import TOOL_PARSERS

CHOICES = ("none", "auto", "required")
_CHOICE_SHAPE = "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': str}}"
_EMPTY_OBJECT = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict] | None  # for the chat template (its tools argument); None: no tools
    choice: str  # "none", "auto", "required" or "function"
    function: str | None  # the function tool_choice names
    json_schema: dict | None  # the schema the output must follow; None: free text
    parser_name: str | None  # the model's parser, for "auto"
    parallel_tool_calls: bool

    def parser(self) -> ToolParser | None:
        """A new parser for one output (None: the output is all content)."""
        if self.choice == "function":
            return NamedFunctionParser(self.function)
        if self.choice == "required":
            return RequiredCallsParser()
        if self.choice == "auto":
            return TOOL_PARSERS[self.parser_name]()
        return None


def plan_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None, parser: str = "hermes") -> ToolPlan:
    """Check the three fields (ValueError naming the field) and plan the request; parser: the model's parser name."""
    if parser not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {parser!r}; allowed: {', '.join(TOOL_PARSERS)}")
    checked = check_tools(tools)
    if parallel_tool_calls is None:
        parallel_tool_calls = True
    elif not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    choice, function = _check_choice(tool_choice, checked)
    by_name = {t["function"]["name"]: t["function"] for t in checked or []}
    schema = None
    if choice == "function":
        schema = by_name[function].get("parameters") or dict(_EMPTY_OBJECT)
    elif choice == "required":
        schema = _required_schema(list(by_name.values()), parallel_tool_calls)
    return ToolPlan(checked, choice, function, schema, parser if choice == "auto" else None, parallel_tool_calls)


def _check_choice(tool_choice: Any, tools: list[dict] | None) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ValueError(f"tool_choice is {tool_choice!r}; {_CHOICE_SHAPE}")
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice is {tool_choice!r} but no tools were given; give tools, or leave tool_choice out")
        return tool_choice, None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(tool_choice.get("function"), dict):
        raise ValueError(f"tool_choice is {_short(tool_choice)}; {_CHOICE_SHAPE}")
    name = tool_choice["function"].get("name")
    if not isinstance(name, str):
        raise ValueError(f"tool_choice.function.name must be a string, got {_short(name)}")
    names = [t["function"]["name"] for t in tools or []]
    if name not in names:
        allowed = ", ".join(names) if names else "no tools were given"
        raise ValueError(f"tool_choice.function.name {name!r} is not one of the tools ({allowed})")
    return "function", name


def _required_schema(functions: list[dict], parallel: bool) -> dict:
    """A list of calls, each {"name": one tool's name, "parameters": that tool's arguments}, as vLLM writes it.

    Each tool's "$defs" move to the root, where its "#/$defs/..." references point.
    """
    items, defs = [], {}
    for fn in functions:
        params = fn.get("parameters") or dict(_EMPTY_OBJECT)
        for key, value in (params.get("$defs") or {}).items():
            if key in defs and defs[key] != value:
                raise ValueError(f"tools: two tools define $defs {key!r} differently; with tool_choice 'required' "
                                 "their definitions share one namespace, so give them different names")
            defs[key] = value
        params = {k: v for k, v in params.items() if k != "$defs"}
        items.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
            "required": ["name", "parameters"],
        })
    schema: dict = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
