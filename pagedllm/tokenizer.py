"""Tokenizer loading and chat prompts.

One place decides how text becomes token ids for a chat, so the offline LLM
and the HTTP server build exactly the same prompt for the same messages.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from pagedllm.chat import check_messages, check_tools
from pagedllm.tool_prompt import fit_tools

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's fast (Rust) tokenizer; the slow Python ones are far too slow to detokenize per step.

    path: a model directory, a hub repo id, or a .gguf file (converted once,
    like the model itself).
    """
    local = os.path.expanduser(path)
    if local.endswith(".gguf") and os.path.isfile(local):
        from pagedllm.model.gguf_convert import ensure_converted

        local = ensure_converted(local)
    try:
        if _names_generic_fast_tokenizer(local):
            # AutoTokenizer would import transformers' model-config machinery
            # (over a second at every start) only to learn the class named here.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(local)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code, use_fast=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e


_GENERIC_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")  # one class under two names (4.x, 5.x)


def _names_generic_fast_tokenizer(directory: str) -> bool:
    """True for a local directory whose tokenizer is the generic fast one over tokenizer.json."""
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and os.path.isfile(os.path.join(directory, "tokenizer.json"))):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class") in _GENERIC_FAST_TOKENIZERS
    except (OSError, ValueError):
        return False


def load_chat_template(value: str) -> str:
    """A chat template given on the command line: a file's path, or the Jinja text itself (as vLLM's --chat-template)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template: give the path of a .jinja file "
                     "or the template's text")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of the rendered chat, as a plain list.

    The template is rendered to text and then encoded without special tokens:
    templates write their own BOS (e.g. Llama 3's <|begin_of_text|>), so letting
    the tokenizer add one as well would double it. continue_final_message leaves
    the last message open (no end-of-turn after it), for the model to go on with
    it (a prefilled reply); it cannot be combined with add_generation_prompt.
    template_kwargs: more variables for the template (vLLM's chat_template_kwargs,
    e.g. {"enable_thinking": False} for Qwen3's).

    tools: OpenAI function tools ({"type": "function", "function": {...}}),
    given to the template; where the template ignores them (or tool calls, or
    tool messages), tool_prompt.fit_tools writes them into the messages.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true: "
                         "either the last message is continued or a new one is started")
    _check_template_kwargs(template_kwargs)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model's tokenizer has no chat template, so chat messages cannot be turned into a prompt; "
            "pass chat_template=<jinja template> or send a plain text prompt instead"
        )
    conversation = check_messages(messages)
    checked_tools = check_tools(tools)

    def render(conv: list[dict], with_tools: list[dict] | None) -> str:
        return _render(tokenizer, conv, template, add_generation_prompt, with_tools, continue_final_message, template_kwargs)

    conversation, checked_tools = fit_tools(render, conversation, checked_tools)
    try:
        text = render(conversation, checked_tools)
    except Exception as exc:  # the template's own checks (raise_exception) or a template bug
        # Null content (an assistant's tool calls) breaks templates that only concatenate strings: try it empty.
        if not any(m["content"] is None for m in conversation):
            raise ValueError(f"the chat template could not render these messages: {type(exc).__name__}: {exc}") from None
        try:
            text = render([{**m, "content": m["content"] or ""} for m in conversation], checked_tools)
        except Exception:
            raise ValueError(f"the chat template could not render these messages: {type(exc).__name__}: {exc}") from None
    check_text("the rendered chat prompt", text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(ids, "input_ids"):  # BatchEncoding or dict-like
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def check_text(what: str, text: str) -> None:
    """ValueError naming `what` if text holds a lone UTF-16 surrogate: a Python string (or JSON, "\\ud800") can
    hold one, and the tokenizer then fails with a TypeError that names no cause."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}: "
                         "text must be valid Unicode (a surrogate only in a high-low pair)") from None


# What apply_chat_template sets itself: chat_template_kwargs may not set these.
_RESERVED_TEMPLATE_VARS = ("messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
                           "chat_template", "tokenize", "return_dict", "return_tensors", "padding", "truncation", "max_length")


def _check_template_kwargs(kwargs) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError("chat_template_kwargs must be an object of template variables")
    taken = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_VARS))
    if taken:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}: give them as the request's own fields")


def _render(tokenizer, conversation: list[dict], template: str, add_generation_prompt: bool, tools: list[dict] | None,
            continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
    extra = dict(template_kwargs or {})
    if continue_final_message:
        extra["continue_final_message"] = True
    text = tokenizer.apply_chat_template(conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                                         tokenize=False, tools=tools, **extra)
    return text if isinstance(text, str) else text[0]  # a batch of one, from some transformers versions
