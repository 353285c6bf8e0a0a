"""Grammars compiled beside the steps, cached by spec, handed to requests when ready.

A request with structured outputs waits outside the scheduler until its
grammar is compiled, so a new schema never stalls the step of the requests
already running: compiling runs on one thread (xgrammar releases the GIL),
and the core polls for finished compiles before each step. Identical specs
share one compile and, afterwards, one cached grammar; a spec that fails to
compile fails only the requests that asked for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait, FIRST_COMPLETED
from typing import Any, Callable

from pagedllm.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse; a JSON schema's grammar is tens to hundreds of KB.
_CACHE_ENTRIES = 256


class StructuredOutputManager:
    def __init__(self, make_backend: Callable[[], Any]) -> None:
        """make_backend: builds the XgrammarBackend (loads the tokenizer), on the compile thread at first use."""
        self._make_backend = make_backend
        self._backend = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedllm-grammar", initializer=_lower_priority)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._compiling: dict[tuple, Future] = {}
        self.num_compiled = 0
        self.compile_seconds = 0.0

    def _ensure_backend(self):
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def cached(self, params: StructuredOutputsParams):
        """The compiled grammar if this spec was compiled before, else None."""
        grammar = self._cache.get(params.key)
        if grammar is not None:
            self._cache.move_to_end(params.key)
        return grammar

    def submit(self, params: StructuredOutputsParams) -> Future:
        """Compile off the step's path; requests with the same spec share the future."""
        key = params.key
        fut = self._compiling.get(key)
        if fut is None:
            fut = self._executor.submit(self._compile, params)
            self._compiling[key] = fut
        return fut

    def collect(self, params: StructuredOutputsParams, fut: Future):
        """A finished compile's grammar (kept in the cache), or raise its ValueError."""
        self._compiling.pop(params.key, None)
        grammar = fut.result()
        self._cache[params.key] = grammar
        self._cache.move_to_end(params.key)
        while len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return grammar

    def wait(self, futures: list[Future], timeout: float) -> None:
        """Block until one of the compiles ends or timeout passes (the core has nothing else to run)."""
        wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    def matcher(self, grammar):
        return self._backend.matcher(grammar)

    def _compile(self, params: StructuredOutputsParams):
        backend = self._ensure_backend()
        t0 = time.perf_counter()
        grammar = backend.compile(params)
        dt = time.perf_counter() - t0
        self.num_compiled += 1
        self.compile_seconds += dt
        logger.debug("compiled a %s grammar in %.1f ms", params.kind, dt * 1e3)
        return grammar

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """The compile thread yields to the step's threads: on a machine with as many cores as OpenMP threads, a
    compile at equal priority takes a core from the model and the whole step waits for its slowest thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: compiles run at the step's priority
        pass
