"""POST /v1/completions: one or more prompts (text or token ids), streamed or whole.

Each prompt becomes one engine request; all are checked before any is
submitted. Choice i * n + j is completion j of prompt i, as OpenAI numbers them.

echo with logprobs scores the prompt too: the engine computes prompt logprobs
(prompt_logprobs=logprobs), and the choice's logprobs cover the prompt tokens
first, the first of them null (nothing comes before it), then the generated
ones. With max_tokens=0 (echo only, the log-likelihood request of evaluation
harnesses) the engine still generates one token, as vLLM's does, and the
answer holds the prompt alone.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.entrypoints.server import sampling
from pagedllm.entrypoints.server.beam_search import beam_params, beam_search
from pagedllm.entrypoints.server.errors import APIError, bad_request, generation_failed
from pagedllm.entrypoints.server.logprobs import completion_logprobs, prompt_logprobs_json
from pagedllm.entrypoints.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from pagedllm.entrypoints.server.state import ServerState, new_id
from pagedllm.entrypoints.server.streaming import DONE, EventStreamResponse, Progress, merge, sse, unless_disconnected
from pagedllm.entrypoints.server.usage import final_usage, running_usage


@dataclass
class _Prepared:
    response_id: str
    model: str
    requests: list  # engine Requests, one per prompt
    prompt_texts: list[str | None]  # for echo: the prompt as given, or decoded from its token ids
    n: int
    prompt_only: bool  # echo with max_tokens=0: the one token generated is not shown
    beam: BeamSearchParams | None


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request) -> Response:
    prep = _prepare(state, body)
    if body.stream:
        return EventStreamResponse(_stream(state, body, prep))
    finals = await unless_disconnected(raw, _collect(state, body, prep))
    return Response(_response(state, body, prep, finals).model_dump_json(), media_type="application/json")


def _prepare(state: ServerState, body: CompletionRequest) -> _Prepared:
    model = state.check_model(body.model)
    sampling.reject_unsupported(body)
    if body.suffix:
        raise bad_request("suffix is not supported by this server", "suffix", "unsupported_parameter")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request(f"best_of must equal n (best-of sampling is not supported), got best_of={body.best_of}", "best_of")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs are not available when stream is true (as in vLLM); for streamed prompt "
                          "scores use echo with logprobs", "prompt_logprobs")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be >= 1, got 0 (0 is allowed only with echo, to score the prompt alone)",
                          "max_tokens")
    if body.use_beam_search and body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported with use_beam_search (beams do not score the prompt): "
                          "drop echo or logprobs", "echo", "unsupported_parameter")
    prompt_only = bool(body.echo) and body.max_tokens == 0
    prompts = sampling.parse_prompts(body.prompt)
    response_id = new_id("cmpl")
    requests, texts, beam = [], [], None
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            text, ids = prompt, list(state.tokenizer.encode(prompt))
        else:
            text, ids = None, prompt
        requested = 1 if prompt_only else body.max_tokens
        max_tokens = sampling.resolve_max_tokens(
            requested, "max_tokens", len(ids), state.max_model_len, sampling.COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        params = sampling.sampling_params(body, max_tokens, body.logprobs, prompt_logprobs=_prompt_logprobs(body))
        beam = beam_params(body, max_tokens)
        requests.append(sampling.make_request(state, {"prompt": text, "prompt_token_ids": ids}, params, f"{response_id}-{i}", "prompt"))
        texts.append(text)
    if body.echo:  # token-id prompts echo as their text
        texts = [t if t is not None else state.tokenizer.decode(r.prompt_token_ids) for t, r in zip(texts, requests)]
    return _Prepared(response_id, model, requests, texts, requests[0].sampling_params.n, prompt_only, beam)


def _prompt_logprobs(body: CompletionRequest) -> int | None:
    """What the engine computes per prompt token: prompt_logprobs as asked, or the logprobs that echo shows."""
    if body.prompt_logprobs is not None:
        return body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        return body.logprobs
    return None


async def _collect(state: ServerState, body: CompletionRequest, prep: _Prepared) -> list[RequestOutput]:
    if prep.beam is not None:
        return list(await asyncio.gather(*(beam_search(state, r, prep.beam, body.logprobs is not None) for r in prep.requests)))
    finals: list[RequestOutput | None] = [None] * len(prep.requests)
    async for i, out in merge([state.engine.generate(r, final_only=True) for r in prep.requests]):
        finals[i] = out
    for out in finals:
        if out is not None and out.error:
            raise generation_failed(out.error)
    return finals  # type: ignore[return-value]


@dataclass
class _Shown:
    """What of one completion the client sees: all of it, or nothing for echo with max_tokens=0."""

    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    stop_reason: int | str | None


def _shown(prep: _Prepared, comp: CompletionOutput) -> _Shown:
    if prep.prompt_only:
        finish = None if comp.finish_reason is None else ("length" if comp.finish_reason in ("stop", "length") else comp.finish_reason)
        return _Shown("", [], [] if comp.logprobs is not None else None, finish, None)
    return _Shown(comp.text, comp.token_ids, comp.logprobs, comp.finish_reason, comp.stop_reason)


def _response(state: ServerState, body: CompletionRequest, prep: _Prepared, finals: list[RequestOutput]) -> CompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        for comp in out.outputs:
            shown = _shown(prep, comp)
            text, ids, entries = shown.text, list(shown.token_ids), list(shown.logprobs or [])
            if body.echo:
                text = _prompt_text(prep, i) + text
                ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or []) + entries
            choices.append(CompletionChoice(
                index=i * prep.n + comp.index, text=text, logprobs=_logprobs(state, body, ids, entries, 0)[0],
                finish_reason=shown.finish_reason, stop_reason=shown.stop_reason,
                prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs) if body.prompt_logprobs is not None else None,
                prompt_token_ids=list(out.prompt_token_ids) if body.return_token_ids else None,
                token_ids=list(shown.token_ids) if body.return_token_ids else None,
            ))
    choices.sort(key=lambda c: c.index)
    completion_tokens = 0 if prep.prompt_only else None
    return CompletionResponse(id=prep.response_id, model=prep.model, system_fingerprint=state.system_fingerprint,
                              choices=choices, usage=final_usage(finals, completion_tokens))


async def _stream(state: ServerState, body: CompletionRequest, prep: _Prepared):
    created = int(time.time())
    finals: list[RequestOutput | None] = [None] * len(prep.requests)
    failed = False
    sent: dict[tuple[int, int], Progress] = {}  # by (prompt, completion index)
    options = body.stream_options
    continuous = options is not None and bool(options.continuous_usage_stats) and bool(options.include_usage)

    def chunk(choices, usage=None) -> str:
        return sse(CompletionResponse(id=prep.response_id, created=created, model=prep.model,
                                      system_fingerprint=state.system_fingerprint, choices=choices, usage=usage))

    try:
        async with aclosing(merge([state.engine.generate(r) for r in prep.requests])) as outputs:
            async for i, out in outputs:
                finals[i] = out
                if out.error:
                    failed = True
                    yield sse(generation_failed(out.error).body())
                    break
                for comp in out.outputs:
                    choice = _delta(state, body, prep, i, out, comp, sent)
                    if choice is not None:
                        p = sent[(i, comp.index)]
                        usage = running_usage(len(out.prompt_token_ids), p.tokens) if continuous else None
                        yield chunk([choice], usage)
    except Exception as exc:  # the engine died mid-stream: say so in the stream
        failed = True
        yield sse(APIError(503, str(exc), code="engine_unavailable").body())
    if not failed and options is not None and options.include_usage:
        done = [f for f in finals if f is not None]
        yield chunk([], final_usage(done, 0 if prep.prompt_only else None))
    yield DONE


def _delta(state: ServerState, body: CompletionRequest, prep: _Prepared, i: int, out: RequestOutput,
           comp: CompletionOutput, sent: dict) -> CompletionChoice | None:
    """What completion comp of prompt i adds since the last chunk; None if nothing to send."""
    shown = _shown(prep, comp)
    if body.echo and not shown.token_ids and shown.finish_reason is None:
        return None  # the echo waits for the whole prompt's logprobs, which come with the first token
    first = (i, comp.index) not in sent
    p: Progress = sent.setdefault((i, comp.index), Progress())
    if p.done:
        return None
    text = shown.text[p.chars:]
    ids, entries = list(shown.token_ids[p.tokens:]), list((shown.logprobs or [])[p.tokens:])
    if body.echo and first:
        text = _prompt_text(prep, i) + text
        ids, entries = list(out.prompt_token_ids) + ids, list(out.prompt_logprobs or []) + entries
    new_tokens = len(shown.token_ids) - p.tokens
    if not (first and (body.echo or body.return_token_ids)) and not text and not (body.logprobs is not None and new_tokens) \
            and shown.finish_reason is None:
        return None
    logprobs, p.text_offset = _logprobs(state, body, ids, entries, p.text_offset)
    new_ids = list(shown.token_ids[p.tokens:])
    p.chars, p.tokens, p.done = len(shown.text), len(shown.token_ids), shown.finish_reason is not None
    return CompletionChoice(
        index=i * prep.n + comp.index, text=text, logprobs=logprobs, finish_reason=shown.finish_reason,
        stop_reason=shown.stop_reason,
        prompt_token_ids=list(out.prompt_token_ids) if body.return_token_ids and first else None,
        token_ids=new_ids if body.return_token_ids else None,
    )


def _logprobs(state: ServerState, body: CompletionRequest, ids: list[int], entries: list, offset: int):
    """The legacy logprobs of these tokens (None if not asked), and the text offset after them."""
    if body.logprobs is None or len(entries) < len(ids):
        return None, offset
    top = None if body.logprob_token_ids else body.logprobs  # the chosen ids replace the best: show all there are
    return completion_logprobs(ids, entries, bool(body.return_tokens_as_token_ids), offset, top,
                               lambda t: state.tokenizer.decode([t]))


def _prompt_text(prep: _Prepared, i: int) -> str:
    return prep.prompt_texts[i] or ""
