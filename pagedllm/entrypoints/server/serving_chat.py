"""POST /v1/chat/completions: messages through the model's chat template, streamed or whole.

The prompt is built by pagedllm.tokenizer.apply_chat_template, the same
function the offline LLM.chat uses, so the server and the offline API see
identical token ids for identical messages.

vLLM's extensions: continue_final_message leaves the last message open for
the model to continue (no generation prompt), and then the reply takes that
message's role, as in vLLM; echo starts the reply with the last message's
content when that message has the reply's role (a prefilled answer comes back
whole).
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.chat import check_messages
from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.entrypoints.server import sampling, serving_tools
from pagedllm.entrypoints.server.beam_search import beam_params, beam_search
from pagedllm.entrypoints.server.errors import APIError, bad_request, generation_failed
from pagedllm.entrypoints.server.logprobs import chat_logprobs, prompt_logprobs_json
from pagedllm.entrypoints.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
)
from pagedllm.entrypoints.server.serving_tools import ToolSetup
from pagedllm.entrypoints.server.state import ServerState, new_id
from pagedllm.entrypoints.server.structured import structured_outputs_of
from pagedllm.entrypoints.server.streaming import DONE, EventStreamResponse, Progress, merge, sse, unless_disconnected
from pagedllm.entrypoints.server.usage import final_usage, running_usage
from pagedllm.tokenizer import apply_chat_template


@dataclass
class _Prepared:
    response_id: str
    model: str
    request: object  # the engine Request
    top_logprobs: int | None  # None: no logprobs asked
    role: str  # the reply's: the assistant's, or the continued last message's
    echo: str  # what the reply starts with (echo), "" for nothing
    beam: BeamSearchParams | None
    tools: ToolSetup | None = None  # the request's tool plan and parser; None: no tools


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw: Request) -> Response:
    prep = _prepare(state, body)
    if body.stream:
        return EventStreamResponse(_stream(state, body, prep))
    final = await unless_disconnected(raw, _collect(state, prep))
    return Response(_response(state, body, prep, final).model_dump_json(), media_type="application/json")


def _prepare(state: ServerState, body: ChatCompletionRequest) -> _Prepared:
    model = state.check_model(body.model)
    sampling.reject_unsupported(body)
    tools = serving_tools.plan_request(body, state.tool_parser)
    structured, field = structured_outputs_of(body)
    forced = serving_tools.forced_grammar(tools, field)
    top = _top_logprobs(body)
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs are not available when stream is true (as in vLLM)", "prompt_logprobs")
    add_generation_prompt = _add_generation_prompt(body)
    try:
        ids = apply_chat_template(
            state.tokenizer, body.messages, add_generation_prompt=add_generation_prompt,
            chat_template=body.chat_template, continue_final_message=bool(body.continue_final_message),
            tools=tools.plan.tools if tools is not None else None, template_kwargs=body.chat_template_kwargs,
        )
        last = check_messages(body.messages)[-1]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    role = "assistant" if add_generation_prompt else last["role"]
    echo = (last.get("content") or "") if body.echo and last["role"] == role else ""
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = body.max_tokens, "max_tokens"
    max_tokens = sampling.resolve_max_tokens(requested, param, len(ids), state.max_model_len, None, "messages")
    renames = {"max_tokens": param, "logprobs": "top_logprobs"}
    params = sampling.sampling_params(body, max_tokens, top, renames, prompt_logprobs=body.prompt_logprobs,
                                      structured=forced or structured)
    if tools is not None and tools.parser is not None and tools.parser.needs_special_tokens and body.skip_special_tokens is None:
        params.skip_special_tokens = False  # the call markers are special tokens (Mistral's [TOOL_CALLS])
    beam = beam_params(body, max_tokens)
    response_id = new_id("chatcmpl")
    request = sampling.make_request(state, {"prompt_token_ids": ids}, params, response_id, "messages", renames)
    shown = -1 if top is not None and body.logprob_token_ids else top  # the chosen ids replace the best: show them all
    return _Prepared(response_id, model, request, shown, role, echo, beam, tools)


def _add_generation_prompt(body: ChatCompletionRequest) -> bool:
    """On unless turned off, or unless the last message is continued (both asked for is a 400)."""
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true: either the last "
                              "message is continued or a new one is started; set add_generation_prompt to false",
                              "continue_final_message")
        return False
    return body.add_generation_prompt is not False


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    """Chat asks with logprobs: bool plus top_logprobs; the engine takes one number (and checks it against its
    max_logprobs: its message then names top_logprobs)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if not body.logprobs:
        return None
    return body.top_logprobs or 0


async def _collect(state: ServerState, prep: _Prepared) -> RequestOutput:
    if prep.beam is not None:
        return await beam_search(state, prep.request, prep.beam, prep.top_logprobs is not None)
    final = None
    async for _, out in merge([state.engine.generate(prep.request, final_only=True)]):
        final = out
    if final is not None and final.error:
        raise generation_failed(final.error)
    return final


def _response(state: ServerState, body: ChatCompletionRequest, prep: _Prepared, final: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for comp in final.outputs:
        message, reason = ChatMessage(role=prep.role, content=prep.echo + comp.text), comp.finish_reason
        if prep.tools is not None and prep.tools.parser is not None:
            content, calls = serving_tools.whole(prep.tools, comp.text)
            message = ChatMessage(role=prep.role, content=content, tool_calls=calls)
            reason = serving_tools.finish_reason(prep.tools, reason, bool(calls))
        choices.append(ChatChoice(
            index=comp.index, message=message, logprobs=_logprobs(body, prep, comp, 0), finish_reason=reason,
            stop_reason=comp.stop_reason, token_ids=list(comp.token_ids) if body.return_token_ids else None,
        ))
    return ChatCompletionResponse(
        id=prep.response_id, model=prep.model, system_fingerprint=state.system_fingerprint, choices=choices,
        usage=final_usage([final]),
        prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs) if body.prompt_logprobs is not None else None,
        prompt_token_ids=list(final.prompt_token_ids) if body.return_token_ids else None,
    )


async def _stream(state: ServerState, body: ChatCompletionRequest, prep: _Prepared):
    created = int(time.time())
    options = body.stream_options
    continuous = options is not None and bool(options.continuous_usage_stats) and bool(options.include_usage)
    num_prompt = len(prep.request.prompt_token_ids)

    def chunk(choices, usage=None, **extra) -> str:
        return sse(ChatCompletionChunk(id=prep.response_id, created=created, model=prep.model, choices=choices,
                                       usage=usage, system_fingerprint=state.system_fingerprint, **extra))

    def so_far(tokens: int):
        return running_usage(num_prompt, tokens) if continuous else None

    # The role comes first, before any token, as in OpenAI's streams; then the echo, as in vLLM's.
    n = prep.request.sampling_params.n
    ids = list(prep.request.prompt_token_ids) if body.return_token_ids else None
    yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role=prep.role, content="")) for j in range(n)], so_far(0),
                prompt_token_ids=ids)
    if prep.echo:
        for j in range(n):
            yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(content=prep.echo))], so_far(0))
    sent: dict[int, Progress] = {}  # by completion index
    final, failed = None, False
    try:
        async with aclosing(merge([state.engine.generate(prep.request)])) as outputs:
            async for _, out in outputs:
                final = out
                if out.error:
                    failed = True
                    yield sse(generation_failed(out.error).body())
                    break
                for comp in out.outputs:
                    choice = _delta(body, prep, comp, sent)
                    if choice is not None:
                        yield chunk([choice], so_far(sent[comp.index].tokens))
    except Exception as exc:  # the engine died mid-stream: say so in the stream
        failed = True
        yield sse(APIError(503, str(exc), code="engine_unavailable").body())
    if not failed and final is not None and options is not None and options.include_usage:
        yield chunk([], final_usage([final]))
    yield DONE


def _delta(body: ChatCompletionRequest, prep: _Prepared, comp: CompletionOutput, sent: dict) -> ChatChunkChoice | None:
    """What completion comp adds since the last chunk; None if nothing to send."""
    p: Progress = sent.setdefault(comp.index, Progress())
    if p.done:
        return None
    text = comp.text[p.chars:]
    start = p.tokens
    if not text and not (prep.top_logprobs is not None and len(comp.token_ids) > start) and comp.finish_reason is None:
        return None
    p.chars, p.tokens, p.done = len(comp.text), len(comp.token_ids), comp.finish_reason is not None
    # content "" rather than absent on a chunk with no new text (the finish chunk), as vLLM: its clients concatenate it.
    delta, reason = DeltaMessage(content=text), comp.finish_reason
    if prep.tools is not None and prep.tools.parser is not None:
        calls = p.tool_calls = p.tool_calls or serving_tools.StreamedCalls(prep.tools)
        content, tool_calls = calls.feed(text, final=p.done)
        if content is None and tool_calls is None and not p.done and prep.top_logprobs is None:
            return None  # held back: it may be the start of a call
        delta = DeltaMessage(content=content, tool_calls=tool_calls)
        reason = serving_tools.finish_reason(prep.tools, reason, calls.called)
    return ChatChunkChoice(
        index=comp.index, delta=delta, logprobs=_logprobs(body, prep, comp, start),
        finish_reason=reason, stop_reason=comp.stop_reason,
        token_ids=list(comp.token_ids[start:]) if body.return_token_ids else None,
    )


def _logprobs(body: ChatCompletionRequest, prep: _Prepared, comp: CompletionOutput, start: int) -> ChatLogprobs | None:
    if prep.top_logprobs is None or comp.logprobs is None:
        return None
    content = chat_logprobs(comp.token_ids[start:], comp.logprobs[start:], prep.top_logprobs, bool(body.return_tokens_as_token_ids))
    return ChatLogprobs(content=content)

