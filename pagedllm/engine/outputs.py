"""What callers get back, shaped like vLLM's outputs so code written for it reads ours."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # one dict per generated token
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None  # set when finish_reason is "error"
    metrics: dict = field(default_factory=dict)
    # With SamplingParams(prompt_logprobs=k): None for the first prompt token, then one dict per token, as in vLLM.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_utilization: float  # token slots holding tokens / token slots in allocated blocks
    kv_cache_tokens: int = 0  # tokens the KV pool holds: num_blocks * block_size
    num_cached_blocks: int = 0  # blocks a prefix lookup can find, in use or free
    peak_used_blocks: int = 0  # most blocks in use at once since start or reset_peak_stats()
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there and not computed again
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_steps: int = 0
    # data_parallel_size > 1: the fields above add up every core's; here each core's own, in core order.
    per_engine: list[EngineStats] | None = None
