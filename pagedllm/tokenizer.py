"""Tokenizer loading and chat prompts.

One place decides how text becomes token ids for a chat, so the offline LLM
and the HTTP server build exactly the same prompt for the same messages.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ROLES_HINT = "each message must be a dict with a 'role' and a 'content'"


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


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of the rendered chat, as a plain list.

    The template is rendered to text and then encoded without special tokens:
    templates write their own BOS (e.g. Llama 3's <|begin_of_text|>), so letting
    the tokenizer add one as well would double it.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model's tokenizer has no chat template, so chat messages cannot be turned into a prompt; "
            "pass chat_template=<jinja template> or send a plain text prompt instead"
        )
    conversation = [_normalized(m, i) for i, m in enumerate(_checked_list(messages))]
    text = tokenizer.apply_chat_template(
        conversation, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(text, str):  # a batch of one, from some transformers versions
        text = text[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(ids, "input_ids"):  # BatchEncoding or dict-like
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _checked_list(messages) -> list:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list; {_ROLES_HINT}")
    return list(messages)


def _normalized(message, index: int) -> dict:
    """Validate one message; flatten OpenAI-style text parts, which most templates cannot render."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index} is {message!r}; {_ROLES_HINT}")
    content = message["content"]
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"message {index}: only text content parts are supported, got {part!r}")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string or a list of text parts, got {content!r}")
    return {**message, "content": content}
