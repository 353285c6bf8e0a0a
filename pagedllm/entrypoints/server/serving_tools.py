"""Tool calls on /v1/chat/completions: the request's tools planned, the output read into tool_calls, whole or streamed.

tool_parsers/ does the reading; this module fits it to the chat endpoint:
the plan's JSON schema becomes the request's grammar (so tool_choice
"required" or a named function always yields a valid call, even from a small
model), the finish reason becomes "tool_calls" when the model called, and
with parallel_tool_calls false only the first call is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.entrypoints.server.errors import bad_request
from pagedllm.entrypoints.server.protocol import ChatCompletionRequest, DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCallOut
from pagedllm.entrypoints.server.tool_parsers import ToolCallStream, ToolParser, ToolPlan, plan_tools
from pagedllm.structured_output.params import StructuredOutputsParams


@dataclass
class ToolSetup:
    plan: ToolPlan
    parser: ToolParser | None  # None: the output is all content


def plan_request(body: ChatCompletionRequest, parser_name: str) -> ToolSetup | None:
    """The request's tool plan, or None when it has no tools; 400s for bad tools, tool_choice or parallel_tool_calls."""
    if not body.tools and body.tool_choice in (None, "none"):
        return None
    try:
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, parser=parser_name)
    except ValueError as exc:
        message = str(exc)
        param = next((p for p in ("tool_choice", "parallel_tool_calls", "tools") if message.startswith(p)), "tools")
        raise bad_request(message, param) from None
    if plan.tools is None and plan.choice == "none":
        return None
    return ToolSetup(plan, plan.parser())


def forced_grammar(setup: ToolSetup | None, other: str | None) -> StructuredOutputsParams | None:
    """The grammar a required or named call forces; `other` names the request's own structured-output field, if any."""
    if setup is None or setup.plan.json_schema is None:
        return None
    if other is not None:
        raise bad_request(f"tool_choice {setup.plan.choice!r} fixes the output's format: it cannot be combined with {other}", other)
    return StructuredOutputsParams(json=setup.plan.json_schema)


def finish_reason(setup: ToolSetup, reason: str | None, called: bool) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call; a named function's call ends with "stop"."""
    if called and reason == "stop" and setup.plan.choice != "function":
        return "tool_calls"
    return reason


def whole(setup: ToolSetup, text: str) -> tuple[str | None, list[ToolCallOut] | None]:
    """(content, tool_calls) of a whole output."""
    extracted = setup.parser.extract(text)
    calls = extracted.tool_calls if setup.plan.parallel_tool_calls else extracted.tool_calls[:1]
    out = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    content = extracted.content
    if content is None and setup.plan.json_schema is not None:
        content = ""  # a forced call has no text at all: "" as vLLM answers (its clients take len(content))
    return content, out or None


class StreamedCalls:
    """One completion's stream of content and tool call deltas."""

    def __init__(self, setup: ToolSetup) -> None:
        self.setup = setup
        self.stream: ToolCallStream = setup.parser.stream()
        self.called = False

    def feed(self, text: str, final: bool) -> tuple[str | None, list[DeltaToolCall] | None]:
        deltas = [self.stream.feed(text) if text else None, self.stream.finish() if final else None]
        content = "".join(d.content for d in deltas if d is not None and d.content) or None
        calls = []
        for d in deltas:
            for c in d.tool_calls if d is not None else ():
                if c.index > 0 and not self.setup.plan.parallel_tool_calls:
                    continue
                first = c.id is not None
                calls.append(DeltaToolCall(index=c.index, id=c.id, type="function" if first else None,
                                           function=DeltaFunctionCall(name=c.name, arguments=c.arguments)))
        self.called = self.called or bool(self.stream.tool_calls) or bool(calls)
        return content, calls or None
