"""AsyncLLMEngine: the server's frontend of one engine core, one output stream per request.

Callers on any event loop submit requests (generate) and aborts; they go
straight to the core, which runs in its own process and steps back to back.
An output thread here takes each step's new token ids from the core client,
turns them into RequestOutputs (output_processor.py: text, stop strings,
logprob strings) and hands them to the event loops of the callers, one
wake-up per loop per step. The event loop itself does HTTP and JSON only.

Outputs are cumulative (text, token ids and logprobs so far), so a stream keeps
only the newest one: a consumer that falls behind skips ahead instead of
working through a backlog. A non-streaming caller asks for the final output
only (final_only), and nothing is built for it before its request ends.

When the core dies, the client notices at once: /health turns to 503 and every
request in flight ends with EngineDeadError within the output thread's next
wake-up, instead of waiting forever.

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

from pagedllm.engine.core_client import EngineDeadError
from pagedllm.engine.messages import EngineCoreRequest
from pagedllm.engine.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineObserver", "RequestSummary"]

_POLL_S = 0.5  # how often the output thread looks up from an idle core to see whether it should stop


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
    """Hooks that the output thread calls; metrics and logging plug in here.

    Every method may run on the output thread, so it must be quick and thread-safe.
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

    # Called on self.loop, by the output thread through call_soon_threadsafe.
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


class AsyncLLMEngine:
    def __init__(self, engine, observer: EngineObserver | None = None, log_interval: float = 5.0) -> None:
        """engine: an LLMEngine (its core client, input and output processors); this object owns its output thread."""
        self.engine = engine
        self.client = engine.client
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.observer = observer or EngineObserver()
        self.log_interval = log_interval
        self._lock = threading.RLock()  # the output processor and the streams
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats: EngineStats | None = None  # replaced whole after each step: safe to read from any thread
        self._streams: dict[str, RequestStream] = {}
        self.error: BaseException | None = None  # why the output thread stopped, if it did

    # --- life cycle -------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self.engine.set_log_stats(True)
        self._stats = self.engine.stats()
        self.engine.output_processor.observer = self.observer  # token timings, step by step
        self._thread = threading.Thread(target=self._run, name="pagedllm-output", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests; those still in flight end with finish_reason "abort". The core itself keeps running."""
        with self._lock:
            self._stopping = True
            ids = list(self._streams)
        if ids and self.client.dead_reason is None:
            self._abort(ids)
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_streams(EngineDeadError(self.unavailable_reason()))
        self.engine.output_processor.observer = None
        if self.client.dead_reason is None:
            try:
                self.engine.set_log_stats(False)
            except EngineDeadError:
                pass

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self.error is None and self.client.dead_reason is None)

    def unavailable_reason(self) -> str:
        """Why requests cannot be taken now, in words for a 503."""
        if self.client.dead_reason is not None:
            return self.client.dead_reason
        if self.error is not None:
            return f"the engine stopped after an internal error: {type(self.error).__name__}: {self.error}"
        if self._stopping:
            return "the engine is shutting down"
        return "the engine is not running" if self._thread is None else "the engine's output thread has stopped"

    # --- requests (any thread) ---------------------------------------------
    def make_request(self, prompt, params=None, request_id: str | None = None) -> EngineCoreRequest:
        """Validate a prompt and its parameters (ValueError saying what is wrong); submits nothing."""
        return self.engine.make_request(prompt, params, request_id)

    async def generate(self, request: EngineCoreRequest, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Submit a request made by make_request and yield its outputs until it finishes.

        final_only: yield only the finished output (a non-streaming client).
        Closing the generator early (a client that went away) aborts the
        request, which frees its blocks before the core's next step.
        """
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        with self._lock:
            if not self.is_running:
                raise EngineDeadError(self.unavailable_reason())
            self.engine.output_processor.add_request(request, final_only)  # ValueError for an id in use
            self._streams[request.request_id] = stream
        try:
            self.client.add_requests([request])
            while True:
                out = await stream.get()
                yield out
                if out.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; a no-op for unknown or finished ones, and once the core is gone."""
        self._abort([request_id])

    def _abort(self, ids: list[str]) -> None:
        with self._lock:
            outputs = self.engine.output_processor.abort(ids)
            self._deliver(outputs)
        if outputs:
            try:
                self.client.abort_requests([o.request_id for o in outputs])
            except EngineDeadError:
                pass

    def stats(self) -> EngineStats:
        """The core's stats now, after what was submitted before (it answers between two steps: not for the event loop)."""
        return self.engine.stats()

    # --- the output thread ------------------------------------------------
    def _run(self) -> None:
        last_log = time.monotonic()
        logged = self._stats
        try:
            while not self._stopping:
                core_out = self.client.get_outputs(timeout=_POLL_S)
                if core_out is None:
                    last_log, logged = time.monotonic(), self._stats  # throughput lines measure busy time only
                    continue
                with self._lock:
                    outputs, aborts = self.engine.output_processor.process_outputs(core_out.outputs)
                if aborts:
                    self.client.abort_requests(aborts)
                if core_out.stats is not None:
                    # Stats first, so a client that sees its answer also sees it counted.
                    self._stats = core_out.stats
                    self.observer.on_step(core_out.stats)
                with self._lock:
                    self._deliver(outputs)
                now = time.monotonic()
                if now - last_log >= self.log_interval and self._stats is not None:
                    if logged is not None and self._stats.num_steps != logged.num_steps:
                        self._log_throughput(logged, self._stats, now - last_log)
                    last_log, logged = now, self._stats
        except EngineDeadError as exc:
            self.error = exc
        except BaseException as exc:  # a bug here: fail every request rather than hang them
            logger.exception("the engine's output thread crashed; failing %d request(s)", len(self._streams))
            self.error = exc
        if self.error is not None:
            self._fail_streams(EngineDeadError(self.unavailable_reason()))

    def _fail_streams(self, error: EngineDeadError) -> None:
        """End every request still in flight with error (the core is gone or we are stopping)."""
        with self._lock:
            outputs = self.engine.output_processor.fail_all(str(error))
            streams, self._streams = self._streams, {}
            for out in outputs:
                self._summarize(out, time.monotonic())
        for stream in streams.values():
            self._post(stream.loop, [(stream.fail, error)])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams' loops; the caller holds self._lock."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        now = time.monotonic()
        for out in outputs:
            if out.finished:
                self._summarize(out, now)
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
            ids = [arg.request_id for _, arg in calls if isinstance(arg, RequestOutput) and not arg.finished]
            if ids:
                self._abort(ids)

    def _summarize(self, out: RequestOutput, now: float) -> None:
        """Report a finished request to the observer and the log."""
        arrival, first = out.metrics["arrival_time"], out.metrics["first_token_time"]
        summary = RequestSummary(
            out.request_id, ",".join(sorted({str(c.finish_reason) for c in out.outputs})), len(out.prompt_token_ids),
            sum(len(c.token_ids) for c in out.outputs), None if first is None else first - arrival, now - arrival, out.error,
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
