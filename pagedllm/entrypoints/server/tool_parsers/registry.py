"""The parsers a model may use on its own (tool_choice "auto"), by name, and how one is chosen for a model."""

from __future__ import annotations

from pagedllm.entrypoints.server.tool_parsers.base import ToolParser
from pagedllm.entrypoints.server.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.server.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.server.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

# What a chat template writes when it renders tools, and the parser for it; the first found wins.
_TEMPLATE_SIGNS = (("<tool_call>", "hermes"), ("<|python_tag|>", "llama3_json"), ("ipython", "llama3_json"),
                   ("[TOOL_CALLS]", "mistral"))


def choose_tool_parser(chat_template: str | None, name: str | None = None) -> str:
    """The parser for a model: the name given (--tool-call-parser), else the one its chat template suggests.

    A template that shows none of the formats gets "hermes": pagedllm then
    adds the tools to the prompt itself, asking for Hermes-style calls
    (pagedllm/tool_prompt.py).
    """
    if name is not None:
        if name not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {name!r}; allowed: {', '.join(TOOL_PARSERS)}")
        return name
    for sign, parser in _TEMPLATE_SIGNS:
        if chat_template and sign in chat_template:
            return parser
    return "hermes"
