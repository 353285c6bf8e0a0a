"""What crosses between the frontend and the engine core: requests in, each step's new tokens out.

Plain, picklable dataclasses and no torch: the frontend process never imports
the model. The messages are small on purpose. A request goes in once; each
step sends back only the tokens it produced (and their logprobs when asked),
the finish reasons, and the errors of requests that failed alone. Text,
stop strings and logprob strings are made on the frontend side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.outputs import EngineStats
from pagedllm.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """A validated request, as the input processor makes it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None  # the text it came from, for outputs; the core does not read it
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class NewLogprobs:
    """The logprobs of one sampled token: its own, its rank, and the best few."""

    logprob: float
    rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class EngineCoreOutput:
    """What one sequence of a request got this step.

    `error` set: the request failed alone (its parameters, its input); all of
    its sequences end with finish_reason "error" and this message.
    """

    request_id: str  # the request's own id, for every one of its n sequences
    index: int  # which completion of the request (0 unless n > 1)
    new_token_ids: list[int]
    new_logprobs: list[NewLogprobs] | None = None
    finish_reason: str | None = None  # stop, length, error; None while it runs
    stop_reason: int | None = None  # the stop token id that ended it
    error: str | None = None
    # prompt_logprobs: the next prompt positions' entries (position p's is token p + 1's), in order.
    prompt_logprobs: list[NewLogprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (set on the first output)
    num_preemptions: int = 0


@dataclass
class EngineCoreOutputs:
    """One step of the core."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats | None = None  # after the step, when the client asked for stats every step
    timestamp: float = field(default_factory=time.monotonic)


@dataclass
class CoreInfo:
    """What the frontend learns from a core once it is ready."""

    model_path: str
    dtype: str  # "bfloat16", "float32", ...
    kv_cache_dtype: str  # the pool's element type: the model's, or int8 / float8_e4m3fn
    device: str
    max_model_len: int
    num_blocks: int
    block_size: int
    bytes_per_block: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    pid: int | None = None  # the core's process, when it has its own

    @property
    def kv_cache_gib(self) -> float:
        return self.num_blocks * self.bytes_per_block / (1 << 30)


@dataclass
class UtilityCall:
    """A method of EngineCore to run between steps (stats, reset_prefix_cache, beam_search...)."""

    call_id: int
    method: str
    args: tuple[Any, ...] = ()
