"""The HTTP API's requests and responses, in OpenAI's shapes (with vLLM's extra sampling fields).

Requests are strict: a string where a number belongs is a 400, not a silent
conversion. Fields a request may leave out are None here, and the defaults
are filled in one place (sampling.py), so "absent" and "given" stay distinct
(max_tokens absent means "whatever fits"). Unknown fields are kept aside and
logged, not rejected, because OpenAI's clients send fields this server has no
use for.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Response(BaseModel):
    # vLLM's extension fields, left out of the JSON while unset so OpenAI's shapes stay as they were.
    _OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_extensions(self, handler):
        data = handler(self)
        for name in self._OMIT_IF_NONE:
            if data.get(name, 0) is None:
                del data[name]
        return data


class StreamOptions(_Request):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage on every chunk, not only at the end


class SamplingRequest(_Request):
    """Fields that completions and chat share: the model and how to sample."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters (the openai client sends them in extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:<id>"
    prompt_logprobs: int | None = None  # vLLM's: per prompt token its logprob and the best k
    return_token_ids: bool | None = None  # vLLM's: prompt_token_ids and token_ids in the response
    use_beam_search: bool | None = None  # vLLM's: n beams, the n best returned
    length_penalty: float | None = None  # beam search: score = cum_logprob / len ** length_penalty
    early_stopping: bool | Literal["never"] | None = None  # beam search, as transformers
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[int] | None = None  # vLLM's: these ids' logprobs in place of the top logprobs
    # Structured outputs (structured.py reads them into one spec): OpenAI's, vLLM's, vLLM's older names.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp's server: a JSON schema for the output
    grammar: str | None = None  # llama.cpp's server: a GBNF grammar for the output


class CompletionRequest(SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of lists of
    # token ids: checked by hand (prompts.py) for a clearer message than a union's.
    prompt: Any = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[Any]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None  # vLLM's: the last message is continued, left open
    echo: bool | None = None  # vLLM's: the reply starts with the last message when it has the reply's role
    chat_template: str | None = None  # vLLM's: a Jinja template instead of the tokenizer's
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the template (enable_thinking...)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    # llama.cpp's server's names: the text, whether to add special tokens (default no), ids with their text
    content: str | None = None
    add_special: bool | None = None
    with_pieces: bool | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses -----------------------------------------------------------


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None  # the request field at fault, when one is
    code: str | None = None


class ErrorResponse(_Response):
    """Every failure's body, in OpenAI's shape (errors.py)."""

    error: ErrorDetail


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(_Response):
    _OMIT_IF_NONE = ("prompt_tokens_details",)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


# vLLM's prompt_logprobs: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}.
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    # vLLM's extensions stay, null when not asked for, as vLLM sends them: its clients read choice.prompt_logprobs,
    # choice.token_ids (an SDK object has no attribute for a field that never came).
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: in a stream, on each choice's first chunk
    token_ids: list[int] | None = None  # return_token_ids: in a stream, this chunk's new tokens


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(_Response):
    index: int
    id: str | None = None  # the first delta of a call carries id, type and name; later ones argument fragments
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatMessage(_Response):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None  # left out when there are none, as OpenAI does

    @model_serializer(mode="wrap")
    def _no_empty_tool_calls(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(_Response):
    # prompt_logprobs and prompt_token_ids stay, null when not asked for, as vLLM sends them (its clients read them).
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM puts chat's at the top level
    prompt_token_ids: list[int] | None = None  # return_token_ids


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler):
        # A delta carries just the fields that changed, as OpenAI's chunks do.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    _OMIT_IF_NONE = ("token_ids",)
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's new tokens


class ChatCompletionChunk(_Response):
    _OMIT_IF_NONE = ("prompt_token_ids",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the first chunk only


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenPiece(_Response):
    id: int
    piece: str  # the token's own text


class TokenizeResponse(_Response):
    tokens: list[int] | list[TokenPiece]  # pieces: with_pieces (llama.cpp's)
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str
    content: str  # the same text under llama.cpp's server's name
