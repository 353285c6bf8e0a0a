"""AsyncLLMEngine: the step loop on its own thread, one output stream per request.

The LLMEngine is not thread-safe, and a step is tens to hundreds of
milliseconds of CPU work: run on the server's event loop it would stall every
other connection for as long. So one thread owns the engine. Callers on any
event loop put adds and aborts into an inbox; the engine thread takes them
between steps (a request that arrives while others run joins the batch at the
next step), steps while there is work, sleeps on a condition when there is
none, and hands each step's outputs back to the event loops of the callers.

Outputs are cumulative (text, token ids and logprobs so far), so a stream keeps
only the newest one: a consumer that falls behind skips ahead instead of
working through a backlog.

No web imports here: the server (entrypoints/server) and the Prometheus
metrics (pagedllm/metrics.py) plug in through `EngineObserver`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagedllm.engine.outputs import EngineStats, RequestOutput
from pagedllm.engine.request import Request

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread is not running (never started, shut down, or crashed)."""


@dataclass
class RequestSummary:
    """How one request went, reported once when it ends."""

    request_id: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    time_to_first_token: float | None  # seconds from arrival; None if no token came
    latency: float  # seconds from arrival to the end
    error: str | None = None


class EngineObserver:
    """Hooks that the engine thread calls; metrics and logging plug in here.

    Every method runs on the engine thread, so it must be quick and thread-safe.
    """

    def on_step(self, stats: EngineStats) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_request_finished(self, summary: RequestSummary) -> None: ...


class RequestStream:
    """The outputs of one request, read on the event loop that submitted it."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    # Called on self.loop, by the engine thread through call_soon_threadsafe.
    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The newest output not yet seen; raises if the engine failed the request."""
        await self._ready.wait()
        self._ready.clear()
        if self._latest is not None:
            out, self._latest = self._latest, None
            self.finished = out.finished
            return out
        assert self._error is not None
        self.finished = True
        raise self._error


@dataclass
class _Timing:
    """What the engine thread tracks per request to time tokens."""

    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0


class AsyncLLMEngine:
    def __init__(self, engine, observer: EngineObserver | None = None, log_interval: float = 5.0) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.observer = observer or EngineObserver()
        self.log_interval = log_interval
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", Request, RequestStream) | ("abort", request_id)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()  # replaced whole after each step: safe to read from any thread
        # Owned by the engine thread alone:
        self._streams: dict[str, RequestStream] = {}
        self._timings: dict[str, _Timing] = {}
        self.error: BaseException | None = None  # why the engine thread died, if it did

    # --- life cycle -------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self.error is None

    # --- requests (any thread) ---------------------------------------------
    def make_request(self, prompt, params=None, request_id: str | None = None) -> Request:
        """Validate a prompt and its parameters (ValueError saying what is wrong); submits nothing.

        Safe off the engine thread: it only reads the tokenizer and the config.
        """
        return self.engine.make_request(prompt, params, request_id)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit a request made by make_request and yield its outputs until it finishes.

        Closing the generator early (a client that went away) aborts the
        request, which frees its blocks before the engine's next step.
        """
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        self._submit(("add", request, stream))
        try:
            while True:
                out = await stream.get()
                yield out
                if out.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; a no-op once the engine has stopped (stopping aborts everything)."""
        try:
            self._submit(("abort", request_id))
        except EngineDeadError:
            pass

    def stats(self) -> EngineStats:
        return self._stats

    def _submit(self, item: tuple) -> None:
        with self._cond:  # checked under the lock that _close drains the inbox under: nothing is left behind
            if self._thread is None or self._stopping or self.error is not None:
                raise EngineDeadError(self.unavailable_reason())
            self._inbox.append(item)
            self._cond.notify()

    def unavailable_reason(self) -> str:
        """Why requests cannot be taken now, in words for a 503."""
        if self.error is not None:
            return f"the engine stopped after an internal error: {type(self.error).__name__}: {self.error}"
        if self._stopping:
            return "the engine is shutting down"
        return "the engine is not running" if self._thread is None else "the engine thread has stopped"

    # --- the engine thread ------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        last_log = time.monotonic()
        logged = self._stats
        try:
            while True:
                with self._cond:
                    idle = False
                    while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                        idle = True
                        self._cond.wait()
                    if self._stopping:
                        break
                    items, self._inbox = self._inbox, []
                if idle:  # throughput lines measure busy time only
                    last_log, logged = time.monotonic(), self._stats
                self._apply(items)
                steps_before = engine.num_steps
                outputs = engine.step()
                # Stats first, so a client that sees its answer also sees it counted.
                self._stats = engine.stats()
                self.observer.on_step(self._stats)
                self._deliver(outputs)
                now = time.monotonic()
                if now - last_log >= self.log_interval:
                    if self._stats.num_steps != logged.num_steps:
                        self._log_throughput(logged, self._stats, now - last_log)
                    last_log, logged = now, self._stats
                if not outputs and engine.num_steps == steps_before:
                    time.sleep(0.001)  # work waits but nothing could be scheduled: don't spin hot
        except BaseException as exc:  # a bug in the engine: fail every request rather than hang them
            logger.exception("engine thread crashed; failing %d request(s)", len(self._streams))
            self.error = exc
        self._close()

    def _apply(self, items: list[tuple]) -> None:
        for item in items:
            if item[0] == "add":
                _, req, stream = item
                try:
                    if req.request_id in self._streams:
                        raise ValueError(f"request id {req.request_id!r} is already in use")
                    self.engine.add(req)
                except Exception as exc:
                    self._post(stream.loop, [(stream.fail, ValueError(str(exc)))])
                    continue
                self._streams[req.request_id] = stream
                self._timings[req.request_id] = _Timing(req.arrival_time, req.num_prompt_tokens)
            else:
                self.engine.abort_request(item[1])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        now = time.monotonic()
        for out in outputs:
            self._time_tokens(out, now)
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop[stream.loop].append((stream.put, out))
        for loop, calls in by_loop.items():
            self._post(loop, calls)

    def _post(self, loop: asyncio.AbstractEventLoop, calls: list) -> None:
        """Run calls on loop, all in one wake-up of it."""

        def run() -> None:
            for fn, arg in calls:
                fn(arg)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # that loop is closed: nobody is reading, so stop computing
            for fn, arg in calls:
                if isinstance(arg, RequestOutput) and not arg.finished:
                    self.engine.abort_request(arg.request_id)

    def _time_tokens(self, out: RequestOutput, now: float) -> None:
        t = self._timings.get(out.request_id)
        if t is None:
            return
        n = sum(len(c.token_ids) for c in out.outputs)
        if n > t.num_tokens:
            if t.first_token is None:
                t.first_token = now
                self.observer.on_first_token(now - t.arrival)
            else:
                self.observer.on_inter_token(now - t.last_token)
            t.last_token, t.num_tokens = now, n
        if out.finished:
            del self._timings[out.request_id]
            reasons = sorted({str(c.finish_reason) for c in out.outputs})
            summary = RequestSummary(
                out.request_id, ",".join(reasons), t.num_prompt_tokens, n,
                None if t.first_token is None else t.first_token - t.arrival, now - t.arrival, out.error,
            )
            self.observer.on_request_finished(summary)
            ttft = "-" if summary.time_to_first_token is None else f"{summary.time_to_first_token:.3f}s"
            logger.info(
                "%s finished (%s): %d prompt + %d output tokens, first token %s, total %.3fs%s",
                summary.request_id, summary.finish_reason, summary.num_prompt_tokens, summary.num_output_tokens,
                ttft, summary.latency, f"; error: {out.error}" if out.error else "",
            )

    def _log_throughput(self, before: EngineStats, now: EngineStats, seconds: float) -> None:
        logger.info(
            "engine: %.1f prompt tokens/s, %.1f generation tokens/s; %d running, %d waiting; "
            "KV cache %.1f%% used (%d/%d blocks); %d preemptions",
            (now.prompt_tokens_total - before.prompt_tokens_total) / seconds,
            (now.generation_tokens_total - before.generation_tokens_total) / seconds,
            now.num_running, now.num_waiting, 100.0 * now.num_used_blocks / max(1, now.num_blocks),
            now.num_used_blocks, now.num_blocks, now.num_preemptions,
        )

    def _close(self) -> None:
        """On the way out: end what is in flight, so that no caller waits forever."""
        with self._cond:
            self._stopping = True
            items, self._inbox = self._inbox, []
        error = EngineDeadError(self.unavailable_reason())
        for item in items:
            if item[0] == "add":
                self._post(item[2].loop, [(item[2].fail, error)])
        if self.error is None:
            try:  # a clean shutdown: abort what runs, and report it as aborted
                self.engine.abort_request(list(self._streams))
                self._deliver(self.engine.step())
                self._stats = self.engine.stats()
            except Exception:
                logger.exception("aborting the requests in flight failed")
        for stream in self._streams.values():
            self._post(stream.loop, [(stream.fail, error)])
        self._streams.clear()
