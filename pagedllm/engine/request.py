"""A request's state as the engine core sees it: token counts and where it stands.

The scheduler only counts tokens: `num_computed_tokens` is how many of
`all_token_ids` have their keys and values in the KV cache. Prefill, chunked
prefill, decode and recompute after preemption are all "compute the tokens
from num_computed_tokens up to num_tokens". Text, logprob strings and stop
strings live on the frontend side (output_processor.py), not here.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.sampling_params import SamplingParams  # plain Python, like everything under engine/

_SEED_MOD = 1 << 64


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs went out (prompt_logprobs; not again after a preemption)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    # Parallel sampling (n > 1): the request computes the prompt once; its n
    # `children`, one sequence per completion, are made with it and draw the
    # first tokens from the prompt's last logits, then the scheduler's update
    # forks them (they share its blocks) and they run on in its place.
    parent: "Request | None" = None
    children: list["Request"] = field(default_factory=list)
    index: int = 0  # which completion of its parent this sequence is
    seed: int | None = None  # this sequence's sampling seed (the parent's seed + index)
    # Structured outputs: this sequence's place in its grammar (structured_output/backend.GrammarState),
    # set once the grammar is compiled; the runner masks its logits with it, the core advances it.
    grammar: Any = None

    def __post_init__(self) -> None:
        # One list that grows by appends, so the scheduler and the runner can
        # slice new tokens without concatenating prompt and output every step.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        if self.parent is None:
            if self.seed is None and self.sampling_params is not None:
                self.seed = self.sampling_params.seed
            n = getattr(self.sampling_params, "n", 1)
            if n > 1 and not self.children:
                self.children = [
                    Request(f"{self.request_id}#{i}", self.prompt_token_ids, self.sampling_params, self.eos_token_ids,
                            self.arrival_time, parent=self, index=i, seed=child_seed(self.seed, i))
                    for i in range(n)
                ]

    @property
    def root(self) -> "Request":
        """The request this sequence belongs to: its parent, or itself."""
        return self.parent or self

    @property
    def sequences(self) -> list["Request"]:
        """The sequences that carry this request's completions: its children once it has any, else itself."""
        return self.children or [self]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


def child_seed(seed: int | None, index: int) -> int | None:
    """Sample i of a seeded request uses seed + i, kept within the 64 bits a generator takes."""
    if seed is None:
        return None
    s = seed + index
    return s - _SEED_MOD if s >= _SEED_MOD else s
