"""Tool call parsers: a model's output split into content and tool calls, whole or streamed.

registry.py names the formats a model may write on its own (tool_choice
"auto"); json_calls.py reads the forced ones (tool_choice "required" or a
named function); tool_choice.py plans a request from its tools, tool_choice
and parallel_tool_calls. base.py states the contract every parser keeps.
"""

from __future__ import annotations

from pagedllm.entrypoints.server.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    make_call_id,
)
from pagedllm.entrypoints.server.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.server.tool_parsers.json_calls import NamedFunctionParser, RequiredCallsParser
from pagedllm.entrypoints.server.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.server.tool_parsers.mistral import MistralToolParser
from pagedllm.entrypoints.server.tool_parsers.registry import TOOL_PARSERS, choose_tool_parser
from pagedllm.entrypoints.server.tool_parsers.tool_choice import ToolPlan, plan_tools

__all__ = [
    "TOOL_PARSERS", "choose_tool_parser", "plan_tools", "ToolPlan", "ExtractedToolCalls", "StreamDelta", "ToolCall",
    "ToolCallDelta", "ToolCallStream", "ToolParser", "make_call_id", "HermesToolParser", "Llama3JsonToolParser",
    "MistralToolParser", "NamedFunctionParser", "RequiredCallsParser",
]
