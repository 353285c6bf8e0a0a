"""Tools, tool calls and tool results for chat templates that do not know them.

Many chat templates ignore the tools they are given (the default model's
ChatML template does), drop an assistant message's tool_calls, or break on
its null content. Which of these a template does is found by rendering small
probe conversations with it; then only what it cannot do is done here, in the
Hermes style (Hermes, Qwen 2.5) that the hermes parser reads back:

- tools: a system message (merged into the first one, if the conversation
  begins with one; the first user message, for templates without a system
  role) lists the functions as JSON inside <tools></tools> and asks
  for calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>;
- an assistant message's tool_calls: written into its content as
  <tool_call> blocks;
- tool messages: a run of them becomes one user message of <tool_response>
  blocks.

A template that renders tools gets them as given, and nothing is added. Tool
call arguments, strings in the API, are given to every template as objects
where they parse as JSON objects (templates write them with tojson), as vLLM
does.
"""

from __future__ import annotations

import json
from typing import Callable

Render = Callable[[list[dict], "list[dict] | None"], str]  # (messages, tools) -> the template's text

_PROBE_NAME = "pagedllm_probe_function"
_PROBE_RESULT = "pagedllm_probe_result"
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
}}
_PROBE_USER = {"role": "user", "content": "Hi."}
_PROBE_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_probe", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": "y"}}},
]}
_PROBE_TOOL_MESSAGE = {"role": "tool", "tool_call_id": "call_probe", "name": _PROBE_NAME, "content": _PROBE_RESULT}

TOOLS_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions, as JSON, are inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with a JSON object holding its name and its arguments inside <tool_call></tool_call> tags, one block for each call:
<tool_call>
{{"name": <function name>, "arguments": <the arguments, a JSON object>}}
</tool_call>"""


def fit_tools(render: Render, conversation: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and the tools to render, so that the template shows all of them."""
    conversation = [_arguments_as_objects(m) for m in conversation]
    template_tools = None
    if tools:
        if _renders_tools(render):
            template_tools = tools
        else:
            system_shown = _shows(render, [{"role": "system", "content": _PROBE_RESULT}, _PROBE_USER], None, _PROBE_RESULT)
            conversation = with_tools_prompt(conversation, tools, system_shown)
    probe_tools = [_PROBE_TOOL] if template_tools else None
    calls_shown = True
    if any(m.get("tool_calls") for m in conversation) or any(m["role"] == "tool" for m in conversation):
        calls_shown = _shows(render, [_PROBE_USER, _PROBE_CALL], probe_tools, _PROBE_NAME)
        if not calls_shown:
            conversation = [calls_as_text(m) for m in conversation]
    if any(m["role"] == "tool" for m in conversation):
        call = _PROBE_CALL if calls_shown else calls_as_text(_PROBE_CALL)
        if not _shows(render, [_PROBE_USER, call, _PROBE_TOOL_MESSAGE], probe_tools, _PROBE_RESULT):
            conversation = results_as_user_text(conversation)
    return conversation, template_tools


def with_tools_prompt(conversation: list[dict], tools: list[dict], system: bool = True) -> list[dict]:
    """The tools listed in the first system message (one is added at the front if there is none).

    system=False, for templates that refuse or drop system messages (Gemma's):
    the list goes at the start of the first user message instead.
    """
    text = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    role = "system" if system else "user"
    at = next((i for i, m in enumerate(conversation) if m["role"] == role), None)
    if system and at != 0:
        return [{"role": "system", "content": text}, *conversation]
    if at is None:
        return [{"role": "user", "content": text}, *conversation]
    message = conversation[at]
    joined = [text, message["content"]] if role == "user" else [message["content"], text]
    merged = {**message, "content": "\n\n".join(part for part in joined if part)}
    return [*conversation[:at], merged, *conversation[at + 1:]]


def calls_as_text(message: dict) -> dict:
    """An assistant message's tool_calls written into its content as <tool_call> blocks."""
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    blocks = []
    for call in calls:
        fn = call["function"]
        blocks.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
                      + "\n</tool_call>")
    content = message.get("content") or ""
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = (content + "\n" if content else "") + "\n".join(blocks)
    return out


def results_as_user_text(conversation: list[dict]) -> list[dict]:
    """Each run of tool messages as one user message of <tool_response> blocks."""
    out: list[dict] = []
    in_run = False
    for message in conversation:
        if message["role"] != "tool":
            out.append(message)
            in_run = False
            continue
        block = f"<tool_response>\n{message['content']}\n</tool_response>"
        if in_run:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
        else:
            out.append({"role": "user", "content": block})
        in_run = True
    return out


def _arguments_as_objects(message: dict) -> dict:
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    parsed = []
    for call in calls:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                value = json.loads(args)
            except ValueError:
                value = None
            if isinstance(value, dict):
                call = {**call, "function": {**fn, "arguments": value}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


def _renders_tools(render: Render) -> bool:
    try:
        with_tools = render([_PROBE_USER], [_PROBE_TOOL])
    except Exception:  # a template that refuses the probe conversation: treated as not knowing tools
        return False
    try:
        return with_tools != render([_PROBE_USER], None)
    except Exception:  # renders only with tools (Hermes 2 Pro's tool_use template loops over them unguarded)
        return True


def _shows(render: Render, conversation: list[dict], tools: list[dict] | None, needle: str) -> bool:
    try:
        return needle in render(conversation, tools)
    except Exception:  # broken by it (null content, a raise_exception on an unknown role)
        return False
