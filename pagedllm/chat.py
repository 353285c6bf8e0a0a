"""Chat messages checked as OpenAI's API checks them, then flattened for a chat template.

The offline LLM.chat and the server's /v1/chat/completions both come here
(through tokenizer.apply_chat_template), so a message is accepted or refused
the same way in both, with a ValueError that names the field
("messages[2].content: ...") and says what is allowed. What is accepted:

- role: system, developer, user, assistant or tool;
- content: a string, or a list of content parts; text parts everywhere
  ({"type": "text", "text": ...}), refusal parts in assistant messages; image,
  audio and file parts are refused (the models served are text-only);
- null (or absent) content only in an assistant message with tool_calls (or
  the older function_call);
- a tool message needs its tool_call_id; name, where given, is a string;
- tool_calls: a list of {"id", "type": "function", "function": {"name", "arguments"}}.

A list of parts becomes one string, since most templates render only string
content. Keys this module does not know are passed to the template as given.

check_tools() checks a request's tools (function definitions) the same way.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
_PART_TYPES = {
    "system": ("text",), "developer": ("text",), "user": ("text",), "tool": ("text",), "assistant": ("text", "refusal"),
}
_UNSUPPORTED_PARTS = ("image_url", "input_audio", "file")
_SHAPE = "each message must be an object with a 'role' and a 'content'"


def check_messages(messages: Any) -> list[dict]:
    """Validated messages, content parts joined into strings; ValueError naming the first bad field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list; {_SHAPE}")
    return [_check_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _check_message(message: Any, where: str) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"{where} is {_short(message)}; {_SHAPE}")
    if "role" not in message:
        raise ValueError(f"{where} has no 'role'; {_SHAPE}")
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"{where}.role is {_short(role)}; allowed roles: {', '.join(ROLES)}")
    out = dict(message)
    if "name" in message and not isinstance(message["name"], str):
        raise ValueError(f"{where}.name must be a string, got {_short(message['name'])}")
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None:
            _check_tool_calls(calls, f"{where}.tool_calls")
        may_be_null = bool(calls) or message.get("function_call") is not None
    else:
        may_be_null = False
        if message.get("tool_calls"):
            raise ValueError(f"{where}.tool_calls is only allowed in an assistant message, not {role!r}")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise ValueError(f"{where}.tool_call_id is required in a tool message: the id of the tool call it answers")
    content = message.get("content")
    if content is None:
        if not may_be_null:
            what = "has no 'content'" if "content" not in message else "has content null"
            raise ValueError(
                f"{where} {what}: content must be a string or a list of content parts"
                + (" (it may be null only in an assistant message with tool_calls)" if role == "assistant" else "")
            )
        out["content"] = None
    elif isinstance(content, str):
        pass
    elif isinstance(content, list):
        out["content"] = "".join(_part_text(p, role, f"{where}.content[{j}]") for j, p in enumerate(content))
    else:
        raise ValueError(f"{where}.content must be a string or a list of content parts, got {_short(content)}")
    return out


def _part_text(part: Any, role: str, where: str) -> str:
    allowed = _PART_TYPES[role]
    kinds = " or ".join(f"{{'type': '{t}', '{t}': str}}" for t in allowed)
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"{where} must be a content part such as {kinds}, got {_short(part)}")
    kind = part["type"]
    if kind in _UNSUPPORTED_PARTS:
        raise ValueError(f"{where}.type {kind!r} is not supported: this server runs text-only models, so content parts "
                         f"must be {' or '.join(repr(t) for t in allowed)}")
    if kind not in allowed:
        raise ValueError(f"{where}.type is {_short(kind)}; a {role} message takes parts of type {' or '.join(repr(t) for t in allowed)}")
    text = part.get(kind)
    if not isinstance(text, str):
        raise ValueError(f"{where}.{kind} must be a string, got {_short(text)}")
    return text


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be a list of tool calls, got {_short(calls)}")
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise ValueError(f"{at} must be an object with 'id', 'type' and 'function', got {_short(call)}")
        if not isinstance(call.get("id"), str):
            raise ValueError(f"{at}.id must be a string")
        if call.get("type", "function") != "function":
            raise ValueError(f"{at}.type must be 'function', got {_short(call.get('type'))}")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ValueError(f"{at}.function must be an object with a string 'name' and string 'arguments' (JSON), got {_short(fn)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_SHAPE = "each tool must be {'type': 'function', 'function': {'name': str, 'description'?: str, 'parameters'?: JSON schema}}"


def check_tools(tools: Any) -> list[dict] | None:
    """The request's tools, checked as OpenAI checks them; None for none (an empty list counts as none).

    Each comes back as {"type": "function", "function": {...}}, the form chat
    templates (and transformers) expect; keys not checked here are kept.
    """
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list; {_TOOL_SHAPE}")
    seen: dict[str, int] = {}
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} is {_short(tool)}; {_TOOL_SHAPE}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type is {_short(tool.get('type'))}; only 'function' tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object; {_TOOL_SHAPE}")
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name is {_short(name)}; a name is 1 to 64 letters, digits, '_' or '-'")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is already the name of tools[{seen[name]}]; names must differ")
        seen[name] = i
        if "description" in fn and not isinstance(fn["description"], (str, type(None))):
            raise ValueError(f"{where}.function.description must be a string, got {_short(fn['description'])}")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ValueError(f"{where}.function.parameters must be a JSON schema object, got {_short(params)}")
            if params.get("type", "object") != "object":
                raise ValueError(f"{where}.function.parameters.type is {_short(params.get('type'))}; the arguments "
                                 "of a function are a JSON object, so its schema's type must be 'object'")
        if "strict" in fn and not isinstance(fn["strict"], (bool, type(None))):
            raise ValueError(f"{where}.function.strict must be true or false, got {_short(fn['strict'])}")
        out.append({**tool, "type": "function", "function": dict(fn)})
    return out or None
