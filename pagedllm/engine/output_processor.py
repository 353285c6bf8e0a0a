"""The core's new token ids -> RequestOutputs: text, stop strings, logprob strings, finish reasons.

This is the frontend's half of a step. The core ends sequences on EOS, stop
token ids, max_tokens and the context length; stop strings need text, so they
are found here, and a sequence that meets one is ended here and reported back
as an abort target, so that the core stops computing it (the core may already
have sampled one more token, which is dropped).

One request's failure stays its own: an exception while turning its tokens
into text ends that request with finish_reason "error" and tells the core to
drop it; the other requests in the same step go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagedllm.engine.messages import EngineCoreOutput, EngineCoreRequest
from pagedllm.engine.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One completion of a request, as its client will see it."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason
            self.detokenizer.finish()  # flush a character cut off by the last token

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.stream_text,  # stream-safe: never text that a stop string may still cut
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _RequestState:
    request: EngineCoreRequest
    seqs: list[_Sequence]
    final_only: bool  # build an output only when the request ends (a non-streaming client)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    error: str | None = None
    prompt_logprobs: list | None = None  # None for the first prompt token, then a dict per token (prompt_logprobs)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def output(self) -> RequestOutput:
        req = self.request
        metrics = {
            "arrival_time": req.arrival_time,
            "first_token_time": self.first_token_time,
            "num_preemptions": self.num_preemptions,
            "num_cached_tokens": self.num_cached_tokens,
        }
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [s.completion() for s in self.seqs],
                             self.finished, self.error, metrics,
                             list(self.prompt_logprobs) if self.prompt_logprobs is not None else None)


class OutputProcessor:
    """Per-request text state on the frontend; not thread-safe (callers hold one lock)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # on_first_token(s) and on_inter_token(s) of an EngineObserver, called as tokens arrive (the server's metrics).
        self.observer = None
        self.requests: dict[str, _RequestState] = {}
        self._token_text: dict[int, str] = {}  # decode_token's cache, for logprob entries

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, req: EngineCoreRequest, final_only: bool = False) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        params = req.sampling_params
        seqs = [_Sequence(i, IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params),
                          logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        state = self.requests[req.request_id] = _RequestState(req, seqs, final_only)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list]:
        """One core step's outputs -> the RequestOutputs to hand out, and what the core must stop
        (request ids, or (id, index) for one sequence of n)."""
        touched: dict[str, _RequestState] = {}
        aborts: list = []
        now = time.monotonic()
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue  # ended here already (aborted, or a stop string): the core's late tokens are dropped
            touched[out.request_id] = state
            try:
                stop = self._apply(state, out, now)
            except Exception as exc:  # this request's text failed; it alone ends
                logger.exception("turning the tokens of request %s into text failed", out.request_id)
                self._fail(state, f"{type(exc).__name__}: {exc}")
                aborts.append(out.request_id)
                continue
            if stop is not None:
                aborts.append(stop)
        results = []
        for request_id, state in touched.items():
            if state.finished:
                del self.requests[request_id]
            elif state.final_only:
                continue
            results.append(state.output())
        return results, aborts

    def _apply(self, state: _RequestState, out: EngineCoreOutput, now: float):
        """Add one sequence's new tokens; returns an abort target if a stop string ended it here."""
        state.num_cached_tokens = out.num_cached_tokens
        state.num_preemptions = out.num_preemptions
        if out.error is not None:
            self._fail(state, out.error)
            return None
        if out.prompt_logprobs:
            prompt = state.request.prompt_token_ids
            for lp in out.prompt_logprobs:
                state.prompt_logprobs.append(self._logprob_entry(prompt[len(state.prompt_logprobs)], lp))
        seq = state.seqs[out.index]
        if seq.finish_reason is not None:
            return None  # a token sampled after a stop string ended it here
        if out.new_token_ids:
            self._time_token(state, now)
        stopped = None
        for k, token in enumerate(out.new_token_ids):
            seq.token_ids.append(token)
            if out.new_logprobs is not None and seq.logprobs is not None:
                self._record_logprobs(seq, token, out.new_logprobs[k])
            stop_str = seq.detokenizer.append(token)
            if stop_str is not None:
                seq.finish("stop", stop_str)
                stopped = out.request_id if len(state.seqs) == 1 else (out.request_id, out.index)
                break
        if stopped is not None:
            return None if out.finish_reason is not None else stopped
        if out.finish_reason is not None:
            seq.finish(out.finish_reason, out.stop_reason)
        return None

    def _time_token(self, state: _RequestState, now: float) -> None:
        if state.first_token_time is None:
            state.first_token_time = now
            if self.observer is not None:
                self.observer.on_first_token(now - state.request.arrival_time)
        elif self.observer is not None and now > state.last_token_time:  # one gap per step, not per sequence
            self.observer.on_inter_token(now - state.last_token_time)
        state.last_token_time = now

    def _record_logprobs(self, seq: _Sequence, token: int, lp) -> None:
        seq.logprobs.append(self._logprob_entry(token, lp))
        seq.cumulative_logprob += lp.logprob

    def _logprob_entry(self, token: int, lp) -> dict[int, Logprob]:
        """{token: its Logprob, then the best few by rank}, each with its text."""
        tok = self.tokenizer
        entry = {token: Logprob(lp.logprob, lp.rank, decode_token(tok, token, self._token_text))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in entry:
                entry[tid] = Logprob(value, rank, decode_token(tok, tid, self._token_text))
        return entry

    @staticmethod
    def _fail(state: _RequestState, message: str) -> None:
        state.error = message
        for seq in state.seqs:
            seq.finish("error")

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """End requests on this side ("abort"); returns their final outputs. Unknown or finished ids are ignored."""
        results = []
        for request_id in request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                for seq in state.seqs:
                    seq.finish("abort")
                results.append(state.output())
        return results

    def fail_all(self, message: str) -> list[RequestOutput]:
        """The core is gone: every request ends with an error."""
        results = []
        for state in self.requests.values():
            self._fail(state, message)
            results.append(state.output())
        self.requests.clear()
        return results
