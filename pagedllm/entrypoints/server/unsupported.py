"""Fields that OpenAI or vLLM define on /v1/completions and /v1/chat/completions but this server does not honour.

A client that sends one of them expects it to change the answer; ignoring it
would hand back something other than what was asked for, with no sign. So
each is a 400 that names it, unless its value is the one that changes
nothing (priority 0, modalities ["text"]...). Fields that only label a
request (user, metadata, store, service_tier...) change no output and are
accepted. Fields no one defines are still ignored, with a warning in the log:
clients send all sorts.

Fields another part of the server owns (structured outputs, logit_bias,
allowed_token_ids, bad_words, tools) are not listed here.
"""

from __future__ import annotations

import logging

from pagedllm.entrypoints.server.errors import bad_request

logger = logging.getLogger(__name__)

# Labels: they describe a request, they do not change its output.
METADATA = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "session_id",
})

# name -> (the values that change nothing, what to say). Both endpoints.
_COMMON: dict[str, tuple] = {
    "priority": ((0, None), "priority scheduling is not supported; every request has priority 0"),
    "lora_request": ((None,), "LoRA adapters are not supported"),
    "mm_processor_kwargs": ((None, {}), "multimodal inputs are not supported"),
    "media_io_kwargs": ((None, {}), "multimodal inputs are not supported"),
    "truncate_prompt_tokens": ((None,), "prompts are never truncated: shorten the prompt"),
    "truncation_side": ((None,), "prompts are never truncated: shorten the prompt"),
    "cache_salt": ((None,), "the prefix cache is shared by all requests and cannot be salted"),
    "kv_transfer_params": ((None,), "disaggregated serving is not supported"),
    "ec_transfer_params": ((None,), "disaggregated serving is not supported"),
    "vllm_xargs": ((None, {}), "custom extensions are not supported"),
    "logits_processors": ((None, []), "custom logits processors are not supported"),
    "repetition_detection": ((None,), None),
    "thinking_token_budget": ((None, -1), "this server has no reasoning budget"),
    "return_token_offsets": ((None, False), None),
    "routed_experts_prompt_start": ((None, 0), None),
    "watermarking": ((None, False), None),
    "spaces_between_special_tokens": ((None, True), None),
    "detokenize": ((None, True), None),
    "stream_interval": ((None, 1), "every step's tokens are streamed as they come"),
    "request_id": ((None,), "response ids are made by the server"),
    "prompt_embeds": ((None,), "send text or token ids"),
    "output_kind": ((None,), None),
    "min_tokens_ratio": ((None,), None),
}

_CHAT: dict[str, tuple] = {
    "functions": ((None,), "OpenAI's legacy function calling; use tools"),
    "function_call": ((None,), "OpenAI's legacy function calling; use tool_choice"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "the model has no reasoning settings"),
    "verbosity": ((None,), None),
    "best_of": ((None, 1), "best-of sampling is not supported"),
    "documents": ((None,), "documents (RAG templates) are not supported"),
    "add_special_tokens": ((None, False), "the chat template writes the special tokens"),
    "include_reasoning": ((None, True), None),
    "return_prompt_text": ((None, False), None),
    "top_logprobs_token_ids": ((None,), None),
}

_COMPLETIONS: dict[str, tuple] = {
    "add_special_tokens": ((None, True), "the tokenizer's special tokens are always added to text prompts"),
    "top_logprobs": ((None,), "use logprobs (an integer) on /v1/completions"),
}


def check_extra_fields(extra: dict, chat: bool) -> None:
    """400 for a defined field this server cannot honour; a warning for fields no one defines."""
    table = {**_COMMON, **(_CHAT if chat else _COMPLETIONS)}
    unknown = []
    for name in sorted(extra):
        if name in METADATA:
            continue
        if name not in table:
            unknown.append(name)
            continue
        harmless, why = table[name]
        value = extra[name]
        if any(value is None if h is None else (type(value) is type(h) and value == h) for h in harmless):
            continue
        message = f"{name} is not supported by this server" + (f" ({why})" if why else "")
        raise bad_request(message, name, "unsupported_parameter")
    if unknown:
        logger.warning("ignoring request fields that neither OpenAI nor vLLM define: %s", ", ".join(unknown))
