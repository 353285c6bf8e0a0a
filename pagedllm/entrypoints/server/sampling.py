"""From an HTTP request's fields to engine Requests: prompts, defaults, SamplingParams, checks.

Everything that can be wrong with a request is found here, before anything is
submitted, so a bad request is a 400 and leaves nothing half-started. The
checks that SamplingParams and the engine already make are not repeated: their
ValueErrors become 400s naming the field.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pagedllm.entrypoints.server.errors import APIError, bad_request, from_value_error
from pagedllm.entrypoints.server.protocol import SamplingRequest
from pagedllm.entrypoints.server.structured import structured_outputs_of
from pagedllm.entrypoints.server.unsupported import check_extra_fields
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.engine.request import Request
    from pagedllm.entrypoints.server.state import ServerState

logger = logging.getLogger(__name__)

# OpenAI's default for /v1/completions (vLLM's too); chat defaults to what fits.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def parse_prompts(prompt) -> list[str | list[int]]:
    """The prompts of a /v1/completions request, each a string or a list of token ids."""
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and not prompt:
        raise bad_request("prompt is an empty list: give at least one prompt", "prompt")
    else:
        raise bad_request(f"prompt must be {_PROMPT_SHAPES}; got {_short(prompt)}", "prompt", "invalid_type")
    for i, p in enumerate(prompts):
        if not p:
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            raise bad_request(f"{where} is empty: give at least one character or token", "prompt")
    return prompts


def reject_unsupported(body: SamplingRequest, allowed_extra: tuple[str, ...] = ()) -> None:
    """400 for OpenAI and vLLM features this engine does not have, rather than silently ignoring them (unsupported.py)."""
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    extra = {k: v for k, v in (body.model_extra or {}).items() if k not in allowed_extra}
    check_extra_fields(extra, chat=hasattr(body, "messages"))


def resolve_max_tokens(
    requested: int | None, param: str, prompt_len: int, max_model_len: int, default: int | None, prompt_param: str = "prompt"
) -> int:
    """max_tokens as asked, or the default capped to what fits; 400 if the prompt or the request cannot fit."""
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, but this model's context (max_model_len) is {max_model_len} tokens: "
            f"shorten the prompt to at most {max_model_len - 1} tokens",
            prompt_param, "context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(
            400,
            f"{param}={requested} cannot fit: this model's context (max_model_len) is {max_model_len} tokens and the "
            f"prompt has {prompt_len}, so at most {room} tokens can be generated; lower {param} or shorten the prompt",
            param, "context_length_exceeded",
        )
    return requested


def sampling_params(
    body: SamplingRequest, max_tokens: int, logprobs: int | None, renames: dict[str, str] | None = None,
    prompt_logprobs: int | None = None, structured: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """SamplingParams from the request; its range checks become 400s naming the field.

    structured: the output's grammar when the caller decided it (a forced tool call); else read from the request."""
    fields = dict(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
        min_tokens=body.min_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, prompt_logprobs=prompt_logprobs,
        logit_bias=body.logit_bias or None, allowed_token_ids=body.allowed_token_ids, bad_words=body.bad_words or None,
        logprob_token_ids=body.logprob_token_ids,
    )
    given = {k: v for k, v in fields.items() if v is not None}
    if structured is None:
        structured, _ = structured_outputs_of(body)
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured, **given)
    except ValueError as exc:
        raise from_value_error(exc, set(type(body).model_fields), renames) from None


def make_request(state: ServerState, prompt: dict, params: SamplingParams, request_id: str, param: str,
                 renames: dict[str, str] | None = None) -> Request:
    """The engine's own checks (token ids in range, prompt length, logprobs against max_logprobs), as 400s on the
    sampling field the message names (renames: the request's name for it, as in sampling_params), else on `param`."""
    try:
        return state.engine.make_request(prompt, params, request_id)
    except ValueError as exc:
        error = from_value_error(exc, {*SamplingRequest.model_fields, "logprobs"}, renames)
        if error.param is None:
            error.param = param
        raise error from None


def _is_token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
