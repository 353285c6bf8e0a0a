"""Data parallelism: N engine cores, each in its own process with its own KV pool, behind one frontend.

DPClient is a CoreClient, so LLMEngine, the server and the benchmarks use it
as they use one ProcClient; make_client builds it when data_parallel_size > 1.

Routing. A core can reuse only the prefix blocks that it computed itself, so
a request goes to the core that most likely still caches its longest prefix.
The frontend cannot see the cores' block pools; it keeps, per core, the
chained hashes of the full prompt blocks it has sent there (a block's hash
covers its tokens and its parent's hash, as the core's keys cover their
parent block), in an LRU as long as that core's pool has blocks. That
approximates what the core still holds (the core may have evicted a block
since; then routing loses a hit, never correctness). A request goes to the
core with the most matching leading blocks; with no match, or a tie, to the
least loaded one (fewest requests in flight, then fewest prompt tokens not
yet started). A core whose seats (max_num_seqs) are all taken is passed over
while another has a free seat: waiting for a seat costs more than computing
the prefix again. Requests added together are routed one after the other,
each seeing the ones before it, so those that share a prefix land together.

Bookkeeping. The client remembers which core runs each request until its
last sequence finishes (or it is aborted), so that an abort reaches that
core; an abort for an id it does not know (finished meanwhile) goes to every
core, which ignore ids they do not run.

Outputs. One thread per core moves that core's step outputs into one queue;
get_outputs hands them out one core step at a time. A step's stats are
replaced by the sum over all cores of each core's latest (totals stay
monotonic, so the server's counters move by differences as with one core),
with each core's own in `per_engine`.

Failure. If any core dies, the engine is dead, as in vLLM: dead_reason names
the core and why, /health answers 503, get_outputs raises EngineDeadError (so
every request in flight, on every core, ends with that error), and the
surviving cores are told to drop their requests. Serving on with fewer cores
would need the frontend to retry the lost requests elsewhere; it does not.

CPU share. Each core gets len(our CPUs) // N threads (OMP_NUM_THREADS, unless
the user set fewer) and is pinned to its own contiguous range of those CPUs,
so the cores' OpenMP pools never fight for a CPU. On CUDA, give each core its
own GPU with CUDA_VISIBLE_DEVICES listing N devices: core i sees the i-th.
Options such as kv_cache_memory and max_num_seqs apply to each core.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import DEAD, CoreClient, EngineDeadError, ProcClient, take_outputs
from pagedllm.engine.messages import CoreInfo, EngineCoreOutputs, EngineCoreRequest
from pagedllm.engine.outputs import EngineStats

logger = logging.getLogger(__name__)

# Utility calls that every core runs, and how their results become one. Anything else is refused
# rather than guessed at; beam_search runs on one core (see call).
_BROADCAST = {
    "stats": lambda results: merge_stats(results),
    "set_log_stats": lambda results: None,
    "reset_peak_stats": lambda results: None,
    "reset_prefix_cache": all,
    "set_max_num_seqs": lambda results: None,
    "check_invariants": lambda results: None,
}


def block_hashes(token_ids: list[int], block_size: int, num_blocks: int | None = None) -> list[int]:
    """Chained hashes of the first full blocks of token_ids: each covers its tokens and every block before it."""
    n = len(token_ids) // block_size if num_blocks is None else num_blocks
    hashes, parent = [], None
    for i in range(n):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """The prompt-block hashes sent to one core, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` this core was sent."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def clear(self) -> None:
        self._hashes.clear()

    def __len__(self) -> int:
        return len(self._hashes)


@dataclass
class _InFlight:
    core: int
    num_prompt_tokens: int
    open_sequences: set[int]  # indices of the request's sequences still running
    started: bool = False  # the core has sent something for it: its prompt no longer waits


@dataclass
class _CoreLoad:
    requests: int = 0  # in flight on the core
    waiting_tokens: int = 0  # prompt tokens of those not started yet
    routed: int = 0  # requests ever sent there (tests, logs)
    prefix_routed: int = 0  # of those, sent there for a prefix match
    index: PrefixIndex = field(default_factory=lambda: PrefixIndex(1))


class DPClient(CoreClient):
    """N ProcClients behind one CoreClient: routes requests, follows aborts, merges outputs and stats."""

    def __init__(self, config: EngineConfig) -> None:
        n = config.data_parallel_size
        if n < 2:
            raise ValueError(f"DPClient is for data_parallel_size >= 2, got {n}")
        self.config = config
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        if config.tensor_parallel_size > 1 and os.environ.get("MASTER_ADDR"):
            raise ValueError("data_parallel_size > 1 with tensor_parallel_size > 1: each core's ranks meet on a free "
                             "port of their own, but MASTER_ADDR is set and would send every group to one address; "
                             "unset MASTER_ADDR and MASTER_PORT")
        core_config = dataclasses.replace(config, data_parallel_size=1)  # each core is a whole engine of its own
        envs, cpus = cpu_shares(n)
        with ThreadPoolExecutor(n, thread_name_prefix="pagedllm-dp-start") as pool:  # load the N models at once
            futures = [pool.submit(ProcClient, core_config, envs[i], cpus[i]) for i in range(n)]
            cores, errors = [], []
            for fut in futures:
                try:
                    cores.append(fut.result())
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            for core in cores:
                core.shutdown()
            raise errors[0]
        self.cores: list[ProcClient] = cores
        self.infos: list[CoreInfo] = [c.info for c in cores]
        # One CoreInfo for callers that know a single core: the pool is every core's together.
        self.info = dataclasses.replace(self.infos[0], num_blocks=sum(i.num_blocks for i in self.infos))
        self._lock = threading.Lock()  # routing state: loads, prefix indexes, requests in flight
        self._loads = [_CoreLoad(index=PrefixIndex(i.num_blocks)) for i in self.infos]
        self._in_flight: dict[str, _InFlight] = {}
        self._latest_stats: list[EngineStats] = [f.result() for f in [c.call_async("stats") for c in cores]]
        self._dead_reason: str | None = None
        self._shutting_down = False
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._pumps = [threading.Thread(target=self._pump, args=(i,), name=f"pagedllm-dp-outputs-{i}", daemon=True)
                       for i in range(n)]
        for t in self._pumps:
            t.start()
        logger.info("%d data-parallel engine cores in processes %s, CPUs %s", n, [i.pid for i in self.infos],
                    [c or "any" for c in cpus])

    # --- requests ----------------------------------------------------------
    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        self._check_alive()
        batches: dict[int, list[EngineCoreRequest]] = {}
        with self._lock:
            for req in reqs:
                i = self._route(req)
                batches.setdefault(i, []).append(req)
        for i, batch in batches.items():
            try:
                self.cores[i].add_requests(batch)
            except EngineDeadError:
                with self._lock:
                    for req in batch:
                        self._forget(req.request_id)
                raise EngineDeadError(self.dead_reason or self._core_reason(i)) from None

    def _route(self, req: EngineCoreRequest) -> int:
        """Pick the core for req and record it there; the caller holds self._lock."""
        known = self._in_flight.get(req.request_id)
        if known is not None:  # an id in use: its own core reports the clash, and the first request is left alone
            return known.core
        hashes = block_hashes(req.prompt_token_ids, self.block_size, (req.num_prompt_tokens - 1) // self.block_size)
        loads = self._loads
        seated = [i for i, load in enumerate(loads) if load.requests < self.max_num_seqs] or list(range(len(loads)))
        matches = {i: loads[i].index.match(hashes) for i in seated}
        best = max(matches.values())
        candidates = [i for i in seated if matches[i] == best]
        chosen = min(candidates, key=lambda i: (loads[i].requests, loads[i].waiting_tokens, i))
        load = loads[chosen]
        load.requests += 1
        load.waiting_tokens += req.num_prompt_tokens
        load.routed += 1
        load.prefix_routed += best > 0
        load.index.add(block_hashes(req.prompt_token_ids, self.block_size))
        self._in_flight[req.request_id] = _InFlight(chosen, req.num_prompt_tokens, set(range(req.sampling_params.n)))
        return chosen

    def _forget(self, request_id: str) -> _InFlight | None:
        """Drop a request from the books (finished, aborted, or never delivered); the caller holds self._lock."""
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            load = self._loads[entry.core]
            load.requests -= 1
            if not entry.started:
                load.waiting_tokens -= entry.num_prompt_tokens
        return entry

    def abort_requests(self, targets: list) -> None:
        self._check_alive()
        per_core: dict[int, list] = {}
        unknown = []
        with self._lock:
            for target in targets:
                request_id, index = (target, None) if isinstance(target, str) else target
                entry = self._in_flight.get(request_id)
                if entry is None:
                    unknown.append(target)
                    continue
                per_core.setdefault(entry.core, []).append(target)
                if index is None:
                    self._forget(request_id)
                else:
                    entry.open_sequences.discard(index)
                    if not entry.open_sequences:
                        self._forget(request_id)
        if unknown:  # finished meanwhile, or never sent: every core ignores an id it does not run
            for i in range(len(self.cores)):
                per_core.setdefault(i, []).extend(unknown)
        for i, batch in per_core.items():
            self.cores[i].abort_requests(batch)

    def where(self, request_id: str) -> int | None:
        """The core that runs a request in flight (tests, debugging)."""
        with self._lock:
            entry = self._in_flight.get(request_id)
            return None if entry is None else entry.core

    def routing_counts(self) -> list[tuple[int, int]]:
        """Per core: (requests routed there, of which for a prefix match)."""
        with self._lock:
            return [(load.routed, load.prefix_routed) for load in self._loads]

    # --- outputs -----------------------------------------------------------
    def _pump(self, i: int) -> None:
        """Move core i's step outputs into the shared queue, updating the books as requests start and end."""
        core = self.cores[i]
        while True:
            try:
                out = core.get_outputs()
            except EngineDeadError:
                self._core_died(i)
                return
            if out is None:
                continue
            with self._lock:
                for o in out.outputs:
                    entry = self._in_flight.get(o.request_id)
                    if entry is None or entry.core != i:
                        continue
                    if not entry.started:
                        entry.started = True
                        self._loads[i].waiting_tokens -= entry.num_prompt_tokens
                    if o.error is not None:
                        self._forget(o.request_id)
                    elif o.finish_reason is not None:
                        entry.open_sequences.discard(o.index)
                        if not entry.open_sequences:
                            self._forget(o.request_id)
                if out.stats is not None:
                    self._latest_stats[i] = out.stats
                    out.stats = merge_stats(self._latest_stats)
            self._outputs.put(out)

    def _core_died(self, i: int) -> None:
        reason = self._core_reason(i)
        with self._lock:
            first = self._dead_reason is None
            if first:
                self._dead_reason = reason
            survivors = {} if self._shutting_down else {
                j: [rid for rid, e in self._in_flight.items() if e.core == j] for j in range(len(self.cores)) if j != i}
            self._in_flight.clear()
        if first and not self._shutting_down:
            logger.error("%s; the engine stops: every request in flight fails", reason)
            for j, ids in survivors.items():  # nobody will read their tokens: free their blocks
                if ids and self.cores[j].dead_reason is None:
                    try:
                        self.cores[j].abort_requests(ids)
                    except EngineDeadError:
                        pass
        self._outputs.put(DEAD)

    def _core_reason(self, i: int) -> str:
        return f"data-parallel engine core {i} of {len(self.cores)}: {self.cores[i].dead_reason or 'not running'}"

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        return take_outputs(self._outputs, timeout, lambda: self._dead_reason)

    # --- utility calls -------------------------------------------------------
    def call(self, method: str, *args):
        self._check_alive()
        if method == "beam_search":  # a whole search on one idle core: the least loaded
            with self._lock:
                i = min(range(len(self.cores)), key=lambda j: (self._loads[j].requests, j))
            return self.cores[i].call(method, *args)
        merge = _BROADCAST.get(method)
        if merge is None:
            raise ValueError(f"{method!r} is not a utility call that the data-parallel client knows how to spread over "
                             f"its cores; known: beam_search, {', '.join(sorted(_BROADCAST))}")
        futures = [core.call_async(method, *args) for core in self.cores]  # all at once, then wait for each
        results = [f.result() for f in futures]
        with self._lock:
            if method == "reset_prefix_cache":
                for load, done in zip(self._loads, results):
                    if done:
                        load.index.clear()
            elif method == "set_max_num_seqs":
                self.max_num_seqs = args[0]
        return merge(results)

    # --- life --------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    @property
    def dead_reason(self) -> str | None:
        if self._dead_reason is None:
            for i, core in enumerate(self.cores):  # a death the pump has not reported yet
                if core.dead_reason is not None:
                    return self._core_reason(i)
        return self._dead_reason

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every core (each ends after its current step; killed if it has not within timeout)."""
        self._shutting_down = True
        for core in self.cores:  # all stop at once, then each is waited for (no threads: this runs at exit too)
            core.request_shutdown()
        for core in self.cores:
            core.shutdown(timeout)
        for t in self._pumps:
            t.join(timeout)


def merge_stats(per_core: list[EngineStats]) -> EngineStats:
    """One EngineStats for all cores: counts and totals add up; utilization is weighted by blocks in use."""
    total = EngineStats(**{f.name: sum(getattr(s, f.name) for s in per_core)
                           for f in dataclasses.fields(EngineStats) if f.name not in ("kv_utilization", "per_engine")},
                        kv_utilization=0.0, per_engine=list(per_core))
    used = sum(s.num_used_blocks for s in per_core)
    if used:
        total.kv_utilization = sum(s.kv_utilization * s.num_used_blocks for s in per_core) / used
    return total


def cpu_shares(n: int) -> tuple[list[dict[str, str]], list[list[int] | None]]:
    """Each of n cores' environment (its OpenMP threads) and CPUs: disjoint equal ranges of the CPUs we may use.

    With fewer CPUs than cores, none is pinned and each gets one thread. A
    user's OMP_NUM_THREADS lower than the share is kept.
    """
    try:
        ours = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        ours = list(range(os.cpu_count() or 1))
    share = len(ours) // n
    threads = max(1, share)
    user = os.environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and 0 < int(user) < threads:
        threads = int(user)
    envs = [{"OMP_NUM_THREADS": str(threads)} for _ in range(n)]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) >= n:
        for i, env in enumerate(envs):
            env["CUDA_VISIBLE_DEVICES"] = visible[i]
    cpus = [ours[i * share:(i + 1) * share] if share else None for i in range(n)]
    return envs, cpus
