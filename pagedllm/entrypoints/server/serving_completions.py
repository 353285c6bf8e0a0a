"""POST /v1/completions: one or more prompts (text or token ids), streamed or whole.

Each prompt becomes one engine request; all are checked before any is
submitted. Choice i * n + j is completion j of prompt i, as OpenAI numbers them.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.entrypoints.server import sampling
from pagedllm.entrypoints.server.errors import APIError, bad_request
from pagedllm.entrypoints.server.logprobs import completion_logprobs
from pagedllm.entrypoints.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from pagedllm.entrypoints.server.state import ServerState, new_id
from pagedllm.entrypoints.server.streaming import DONE, EventStreamResponse, Progress, merge, sse, unless_disconnected


@dataclass
class _Prepared:
    response_id: str
    model: str
    requests: list  # engine Requests, one per prompt
    prompt_texts: list[str | None]  # for echo: the prompt as given, or decoded from its token ids
    n: int


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request) -> Response:
    prep = _prepare(state, body)
    if body.stream:
        return EventStreamResponse(_stream(state, body, prep))
    finals = await unless_disconnected(raw, _collect(state, prep))
    return Response(_response(body, prep, finals).model_dump_json(), media_type="application/json")


def _prepare(state: ServerState, body: CompletionRequest) -> _Prepared:
    model = state.check_model(body.model)
    sampling.reject_unsupported(body)
    if body.suffix:
        raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request(f"best_of must equal n (best-of sampling is not supported), got best_of={body.best_of}", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, which this server does not compute: drop one", "echo")
    prompts = sampling.parse_prompts(body.prompt)
    response_id = new_id("cmpl")
    requests, texts = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            text, ids = prompt, list(state.tokenizer.encode(prompt))
        else:
            text, ids = None, prompt
        max_tokens = sampling.resolve_max_tokens(
            body.max_tokens, "max_tokens", len(ids), state.max_model_len, sampling.COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        params = sampling.sampling_params(body, max_tokens, body.logprobs)
        requests.append(sampling.make_request(state, {"prompt": text, "prompt_token_ids": ids}, params, f"{response_id}-{i}", "prompt"))
        texts.append(text)
    if body.echo:  # token-id prompts echo as their text
        texts = [t if t is not None else state.tokenizer.decode(r.prompt_token_ids) for t, r in zip(texts, requests)]
    return _Prepared(response_id, model, requests, texts, requests[0].sampling_params.n)


async def _collect(state: ServerState, prep: _Prepared) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(prep.requests)
    async for i, out in merge([state.engine.generate(r, final_only=True) for r in prep.requests]):
        finals[i] = out
    for out in finals:
        if out is not None and out.error:
            raise APIError(500, f"generation failed: {out.error}", code="internal_error")
    return finals  # type: ignore[return-value]


def _response(body: CompletionRequest, prep: _Prepared, finals: list[RequestOutput]) -> CompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        for comp in out.outputs:
            text = comp.text
            if body.echo:
                text = _prompt_text(prep, i) + text
            choices.append(CompletionChoice(
                index=i * prep.n + comp.index, text=text, logprobs=_logprobs(body, comp, 0, 0),
                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
            ))
    choices.sort(key=lambda c: c.index)
    return CompletionResponse(id=prep.response_id, model=prep.model, choices=choices, usage=_usage(finals))


async def _stream(state: ServerState, body: CompletionRequest, prep: _Prepared):
    created = int(time.time())
    finals: list[RequestOutput | None] = [None] * len(prep.requests)
    failed = False
    sent: dict[tuple[int, int], Progress] = {}  # by (prompt, completion index)

    def chunk(choices, usage=None) -> str:
        return sse(CompletionResponse(id=prep.response_id, created=created, model=prep.model, choices=choices, usage=usage))

    try:
        async with aclosing(merge([state.engine.generate(r) for r in prep.requests])) as outputs:
            async for i, out in outputs:
                finals[i] = out
                if out.error:
                    failed = True
                    yield sse(APIError(500, f"generation failed: {out.error}", code="internal_error").body())
                    break
                for comp in out.outputs:
                    choice = _delta(body, prep, i, comp, sent)
                    if choice is not None:
                        yield chunk([choice])
    except Exception as exc:  # the engine died mid-stream: say so in the stream
        failed = True
        yield sse(APIError(503, str(exc), code="engine_unavailable").body())
    if not failed and body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], _usage([f for f in finals if f is not None]))
    yield DONE


def _delta(body: CompletionRequest, prep: _Prepared, i: int, comp: CompletionOutput, sent: dict) -> CompletionChoice | None:
    """What completion comp of prompt i adds since the last chunk; None if nothing to send."""
    first = (i, comp.index) not in sent
    p: Progress = sent.setdefault((i, comp.index), Progress())
    if p.done:
        return None
    text = comp.text[p.chars:]
    if body.echo and first:
        text = _prompt_text(prep, i) + text
    new_tokens = len(comp.token_ids) - p.tokens
    if not text and not (body.logprobs is not None and new_tokens) and comp.finish_reason is None:
        return None
    logprobs = _logprobs(body, comp, p.tokens, p.text_offset)
    if logprobs is not None:
        p.text_offset += sum(len(e[t].decoded_token or "") for t, e in zip(comp.token_ids[p.tokens:], comp.logprobs[p.tokens:]))
    p.chars, p.tokens, p.done = len(comp.text), len(comp.token_ids), comp.finish_reason is not None
    return CompletionChoice(
        index=i * prep.n + comp.index, text=text, logprobs=logprobs, finish_reason=comp.finish_reason, stop_reason=comp.stop_reason
    )


def _logprobs(body: CompletionRequest, comp: CompletionOutput, start: int, offset: int):
    if body.logprobs is None or comp.logprobs is None:
        return None
    return completion_logprobs(comp.token_ids[start:], comp.logprobs[start:], bool(body.return_tokens_as_token_ids), offset)


def _prompt_text(prep: _Prepared, i: int) -> str:
    return prep.prompt_texts[i] or ""


def _usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
