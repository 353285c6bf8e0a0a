"""The engine core's own process: `python -m pagedllm.engine.core_proc FD`, started by core_client.ProcClient.

It reads (EngineConfig, log level) from the socket FD, builds the EngineCore
on its main thread (the thread that then runs every step: the model's OpenMP
threads are fastest there), answers "ready" with the CoreInfo, or "failed"
with the error, and then loops:

- a reader thread takes messages off the socket into a queue, so the
  frontend never waits on a step to hand over a request;
- the main thread applies what is queued (adds, aborts, utility calls),
  runs one step if there is work, sends its outputs, and blocks on the
  queue only when there is nothing to do.

It ends on ("shutdown",) or when the frontend's end of the socket closes
(the frontend exited or died); an error outside any one request (a broken
invariant) is logged, reported as ("dead", message), and ends it.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

logger = logging.getLogger("pagedllm.engine.core_proc")


def run_core_loop(core, conn: Connection) -> int:
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)  # the frontend is gone

    threading.Thread(target=read, name="pagedllm-core-input", daemon=True).start()
    while True:
        # Apply everything queued; wait on the queue only while there is nothing to run.
        while True:
            try:
                msg = inbox.get_nowait() if core.has_work() else inbox.get()
            except queue.Empty:
                break
            if msg is None or msg[0] == "shutdown":
                return 0
            _handle(core, conn, msg)
        try:
            out = core.step()
            if core.log_stats:
                out.stats = core.stats()
        except Exception as exc:
            logger.exception("the engine core failed outside any one request; it stops")
            conn.send(("dead", f"{type(exc).__name__}: {exc}"))
            return 1
        if out.outputs or out.stats is not None:
            try:
                conn.send(("outputs", out))
            except OSError:
                return 0  # the frontend is gone


def _handle(core, conn: Connection, msg: tuple) -> None:
    kind = msg[0]
    if kind == "add":
        for req in msg[1]:
            core.add_request(req)
    elif kind == "abort":
        core.abort_requests(msg[1])
    elif kind == "call":
        _, call_id, method, args = msg
        try:
            result = (True, getattr(core, method)(*args))
        except Exception as exc:
            result = (False, exc)
        try:
            conn.send(("result", call_id, *result))
        except Exception as exc:  # the result or exception does not pickle
            conn.send(("result", call_id, False, RuntimeError(f"{type(exc).__name__}: {exc}")))
    else:
        raise ValueError(f"unknown message {kind!r} from the frontend")


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when the core stops
    try:
        config, log_level = conn.recv()
    except (EOFError, OSError):
        return 1
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pagedllm.engine.core import EngineCore

    try:
        core = EngineCore(config)
    except Exception as exc:
        if not isinstance(exc, ValueError):
            logger.exception("the engine core failed to start")
        conn.send(("failed", (type(exc).__name__, str(exc))))
        return 1
    conn.send(("ready", core.info))
    try:
        return run_core_loop(core, conn)
    finally:
        core.shutdown()  # the other tensor-parallel ranks stop with it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
