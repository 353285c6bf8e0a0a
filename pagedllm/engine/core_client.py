"""How the frontend talks to an EngineCore: in this process, or in a process of its own.

Both clients take requests, aborts and utility calls in order (first in,
first out, so an abort followed by `stats` sees the blocks freed) and hand
out one step's EngineCoreOutputs per `get_outputs`.

ProcClient is the default. The core runs in a child process (`python -m
pagedllm.engine.core_proc`, so the caller's `__main__` is never imported
again) that loops on its input and runs steps back to back; the two talk
over a socket pair with pickled messages (benchmarks/transport.py measured
the choice). A reader thread here routes step outputs to a queue and call
results to their callers, and notices at once when the core exits: every
caller then gets EngineDeadError with the reason (exit code or signal),
never a hang. The child has its own session, so Ctrl-C at a terminal reaches
only the frontend, which decides when the core stops.

Why not a thread of the caller's process: the model's threads (OpenMP)
run fastest on the thread that built it and with nothing else in the
process doing Python work beside them; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection

from pagedllm.config import EngineConfig
from pagedllm.engine.messages import CoreInfo, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)

DEAD = object()  # queued when the core (or, with data parallelism, any core) is gone


class EngineDeadError(RuntimeError):
    """The engine core is not running (never started, shut down, or crashed)."""


class CoreClient:
    info: CoreInfo

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        """Submit requests; those given together reach the core together (one step admits them all)."""
        raise NotImplementedError

    def abort_requests(self, targets: list) -> None:
        raise NotImplementedError

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        """The next step's outputs; None if none came within timeout. Raises EngineDeadError once the core is gone."""
        raise NotImplementedError

    def call(self, method: str, *args):
        """Run an EngineCore method between steps and return its result."""
        raise NotImplementedError

    @property
    def dead_reason(self) -> str | None:
        """Why the core stopped, or None while it runs."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError


def take_outputs(outputs: queue.SimpleQueue, timeout: float | None, dead_reason) -> EngineCoreOutputs | None:
    """The next outputs from a client's queue (None after timeout); EngineDeadError once DEAD is queued, with
    dead_reason(), for this caller and every later one."""
    try:
        item = outputs.get(timeout=timeout)
    except queue.Empty:
        return None
    if item is DEAD:
        outputs.put(DEAD)
        raise EngineDeadError(dead_reason())
    return item


def make_client(config: EngineConfig) -> CoreClient:
    if config.data_parallel_size > 1:
        if not config.core_process:
            raise ValueError(f"data_parallel_size={config.data_parallel_size} runs each engine core in a process of its "
                             f"own: it needs core_process=True")
        from pagedllm.engine.dp_client import DPClient

        return DPClient(config)
    return ProcClient(config) if config.core_process else InprocClient(config)


class InprocClient(CoreClient):
    """The core in this process: get_outputs runs one step on the calling thread."""

    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.engine.core import EngineCore

        self.core = EngineCore(config)
        self.info = self.core.info
        self._inbox: list[tuple] = []
        self._cond = threading.Condition()
        self._core_lock = threading.Lock()  # one thread in the core at a time
        self._stopped = False
        self._dead_reason: str | None = None

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        self._put(("add", list(reqs)))

    def abort_requests(self, targets: list) -> None:
        self._put(("abort", list(targets)))

    def _put(self, item: tuple) -> None:
        with self._cond:
            if self._stopped:
                raise EngineDeadError(self.dead_reason)
            self._inbox.append(item)
            self._cond.notify()

    def _apply_inbox(self) -> None:
        with self._cond:
            items, self._inbox = self._inbox, []
        for kind, arg in items:
            if kind == "add":
                for req in arg:
                    self.core.add_request(req)
            else:
                self.core.abort_requests(arg)

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._inbox or self._stopped or self.core.has_work(), timeout):
                return None
            if self._stopped:
                raise EngineDeadError(self.dead_reason)
        with self._core_lock:
            try:
                self._apply_inbox()
                if not self.core.has_work():
                    return None
                out = self.core.step()
                if self.core.log_stats:
                    out.stats = self.core.stats()
                return out
            except Exception as exc:  # outside any one request: the core cannot go on, as a core process would stop
                logger.exception("the engine core failed outside any one request; it stops")
                with self._cond:
                    self._stopped = True
                    self._dead_reason = f"the engine core stopped after an internal error: {type(exc).__name__}: {exc}"
                raise EngineDeadError(self._dead_reason) from exc

    def call(self, method: str, *args):
        if self._stopped:
            raise EngineDeadError(self.dead_reason)
        with self._core_lock:
            self._apply_inbox()
            return getattr(self.core, method)(*args)

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._dead_reason = self._dead_reason or "the engine core was shut down"
            self._cond.notify_all()
        with self._core_lock:
            self.core.shutdown()


class ProcClient(CoreClient):
    """The core in a child process, over a socket pair.

    env: variables to set in the child on top of ours (a data-parallel core's
    OMP_NUM_THREADS); cpus: the CPUs the child may run on, set before it has
    imported torch, so that every thread it starts inherits them.
    """

    def __init__(self, config: EngineConfig, env: dict[str, str] | None = None, cpus: list[int] | None = None) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, **(env or {})}
        # The child imports pagedllm from where this process did, installed or not.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.engine.core_proc", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        theirs.close()
        if cpus:
            try:
                os.sched_setaffinity(self.proc.pid, cpus)
            except (AttributeError, OSError) as exc:  # not Linux, or CPUs we may not use: unpinned is still correct
                logger.warning("could not pin the engine core to CPUs %s: %s", cpus, exc)
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._dead_reason: str | None = None
        self._shutting_down = False
        try:
            self._conn.send((config, logging.getLogger().getEffectiveLevel()))
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            kind, payload = "failed", None
        if kind != "ready":
            self._conn.close()
            code = self.proc.wait()
            if payload is None:
                raise RuntimeError(f"the engine core process failed to start ({_describe_exit(code)}); its log is above")
            error_type, message = payload
            raise (ValueError if error_type == "ValueError" else RuntimeError)(message)
        self.info: CoreInfo = payload
        self._reader = threading.Thread(target=self._read, name="pagedllm-core-reader", daemon=True)
        self._reader.start()

    # --- to the core -----------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            if self._dead_reason is not None:
                raise EngineDeadError(self._dead_reason)
            try:
                self._conn.send(msg)
            except OSError:
                raise EngineDeadError(self._dead_reason or "the engine core process is gone") from None

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        self._send(("add", list(reqs)))

    def abort_requests(self, targets: list) -> None:
        self._send(("abort", list(targets)))

    def call(self, method: str, *args):
        return self.call_async(method, *args).result()

    def call_async(self, method: str, *args) -> Future:
        """Send a utility call and return at once; the future holds its result (several cores asked at once)."""
        future: Future = Future()
        with self._send_lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        try:
            self._send(("call", call_id, method, args))
        except EngineDeadError:
            self._calls.pop(call_id, None)
            raise
        return future

    # --- from the core ---------------------------------------------------
    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        return take_outputs(self._outputs, timeout, lambda: self._dead_reason)

    def _read(self) -> None:
        reason = None
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "outputs":
                    self._outputs.put(msg[1])
                elif kind == "result":
                    _, call_id, ok, value = msg
                    future = self._calls.pop(call_id)
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                elif kind == "dead":
                    reason = f"the engine core stopped after an internal error: {msg[1]}"
                    break
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading from the engine core failed")
        if reason is None:
            if self._shutting_down:
                reason = "the engine core was shut down"
            else:
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                reason = f"the engine core process died ({_describe_exit(code)})"
        with self._send_lock:
            self._dead_reason = reason
            calls, self._calls = self._calls, {}
        if not self._shutting_down:
            logger.error("%s; failing every request in flight", reason)
        for future in calls.values():
            future.set_exception(EngineDeadError(reason))
        self._outputs.put(DEAD)

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def request_shutdown(self) -> None:
        """Tell the core to stop after its current step, without waiting (several cores stop at once)."""
        if self.proc.poll() is None and not self._shutting_down:
            self._shutting_down = True
            try:
                with self._send_lock:
                    self._conn.send(("shutdown",))
            except OSError:
                pass

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core: it ends after its current step; killed if it has not within timeout."""
        if self.proc.poll() is None:
            self.request_shutdown()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the engine core did not stop within %.0fs; killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)
        self._conn.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
