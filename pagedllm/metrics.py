"""Prometheus metrics for the server: what an operator graphs and alerts on.

The collectors live in a registry owned by one ServerMetrics object (one per
app), never in prometheus_client's global registry, so several servers (as in
the tests) can live in one process. The async engine feeds it through its
observer hooks, on the engine thread; prometheus_client's collectors are
thread-safe, so /metrics can be scraped on the event loop at any time.

Names follow vLLM's, with a pagedllm_ prefix and Prometheus' underscores.
The engine-wide series add up every engine core (data_parallel_size > 1);
the pagedllm_engine_* series show each core's own, labelled engine="0", "1"...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from pagedllm.engine.async_engine import RequestSummary
    from pagedllm.engine.outputs import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges in seconds, from a fast CPU step to a long queue.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    """The server's collectors, updated through the async engine's EngineObserver hooks."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels, name = self.registry, ["model_name"], model_name

        def gauge(n: str, doc: str):
            return Gauge(n, doc, labels, registry=r).labels(name)

        def counter(n: str, doc: str):
            return Counter(n, doc, labels, registry=r).labels(name)

        def histogram(n: str, doc: str, buckets):
            return Histogram(n, doc, labels, buckets=buckets, registry=r).labels(name)

        self.running = gauge("pagedllm_num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("pagedllm_num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("pagedllm_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.preemptions = counter("pagedllm_num_preemptions", "Requests preempted because KV blocks ran out.")
        self.prompt_tokens = counter("pagedllm_prompt_tokens", "Prompt tokens of the requests admitted.")
        self.generation_tokens = counter("pagedllm_generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("pagedllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("pagedllm_prefix_cache_hits", "Prompt tokens found in the prefix cache, not computed again.")
        self.ttft = histogram("pagedllm_time_to_first_token_seconds", "Time from arrival to the first output token.", _TTFT_BUCKETS)
        self.itl = histogram("pagedllm_inter_token_latency_seconds", "Time between two output tokens of a request.", _ITL_BUCKETS)
        self.e2e = histogram("pagedllm_e2e_request_latency_seconds", "Time from arrival to the end of a request.", _E2E_BUCKETS)
        self._finished = Counter(
            "pagedllm_request_success", "Requests that ended, by finish reason.", ["model_name", "finished_reason"], registry=r
        )
        labels = ["model_name", "engine"]
        self._engine_running = Gauge("pagedllm_engine_num_requests_running", "Requests in one engine core's running batch.",
                                     labels, registry=r)
        self._engine_waiting = Gauge("pagedllm_engine_num_requests_waiting", "Requests waiting in one engine core.",
                                     labels, registry=r)
        self._engine_kv_usage = Gauge("pagedllm_engine_kv_cache_usage_perc", "Fraction of one engine core's KV blocks "
                                      "in use (0 to 1).", labels, registry=r)
        self._engine_prefix_queries = Counter("pagedllm_engine_prefix_cache_queries", "Prompt tokens looked up in one "
                                              "engine core's prefix cache.", labels, registry=r)
        self._engine_prefix_hits = Counter("pagedllm_engine_prefix_cache_hits", "Prompt tokens found in one engine "
                                           "core's prefix cache.", labels, registry=r)
        self._model_name = model_name
        # Engine totals seen so far: counters move by the difference.
        self._seen = (0, 0, 0, 0, 0)
        self._engine_seen: dict[str, tuple[int, int]] = {}

    # --- EngineObserver hooks (engine thread) -------------------------------
    def on_step(self, stats: EngineStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.num_used_blocks / max(1, stats.num_blocks))
        totals = (stats.num_preemptions, stats.prompt_tokens_total, stats.generation_tokens_total,
                  stats.prefix_cache_queries, stats.prefix_cache_hits)
        counters = (self.preemptions, self.prompt_tokens, self.generation_tokens, self.prefix_queries, self.prefix_hits)
        for counter, new, old in zip(counters, totals, self._seen):
            if new > old:
                counter.inc(new - old)
        self._seen = totals
        for i, core in enumerate(stats.per_engine or [stats]):
            self._on_engine_step(str(i), core)

    def _on_engine_step(self, engine: str, stats: EngineStats) -> None:
        name = self._model_name
        self._engine_running.labels(name, engine).set(stats.num_running)
        self._engine_waiting.labels(name, engine).set(stats.num_waiting)
        self._engine_kv_usage.labels(name, engine).set(stats.num_used_blocks / max(1, stats.num_blocks))
        totals = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        seen = self._engine_seen.get(engine, (0, 0))
        for counter, new, old in zip((self._engine_prefix_queries, self._engine_prefix_hits), totals, seen):
            if new > old:
                counter.labels(name, engine).inc(new - old)
        self._engine_seen[engine] = totals

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_request_finished(self, summary: RequestSummary) -> None:
        self._finished.labels(self._model_name, summary.finish_reason or "unknown").inc()
        self.e2e.observe(summary.latency)

    # --- scrape (event loop) ----------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
