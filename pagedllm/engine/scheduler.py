"""Continuous batching: who runs this step and how many tokens each computes.

The scheduler counts tokens only. A request computes the tokens from
`num_computed_tokens` to `num_tokens` (its whole prompt, a chunk of it, one
decode token, or everything again after a preemption), limited by the step's
token budget. Running requests are served first, in admission order; then
waiting ones in arrival order. When the pool runs out of blocks, the most
recently admitted running request is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed later.

After the step, `update()` takes the sampled tokens: it appends them, forks
the children of a request whose prompt is done (n > 1: they share its blocks
and run on in its place), checks the stop conditions and frees what finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import FinishReason, Request, RequestStatus

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    @classmethod
    def from_engine(cls, config: EngineConfig, max_model_len: int) -> SchedulerConfig:
        """The scheduler's budgets from the engine's options; max_model_len as resolved against the model."""
        return cls(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                   max_model_len=max_model_len)


@dataclass
class ScheduledRequest:
    """One request's share of a step, as the model runner needs it."""

    request: Request
    start_pos: int  # = num_computed_tokens before this step
    num_new_tokens: int
    block_tables: list[list[int]]  # the live table of each KV cache group; the runner reads them before anything changes them
    # The sequences that draw their next token from this step's last logits, one sampled row each: none when the
    # step ends before the known tokens do (a prompt chunk), else the request itself, or, for a request with
    # n > 1 whose prompt this step completes, its n children (update() forks them once they have their tokens).
    sample_seqs: tuple[Request, ...] = ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start_pos : self.start_pos + self.num_new_tokens]

    @property
    def needs_sample(self) -> bool:
        """Whether this step reaches the end of the known tokens, so that its last logits pick the next ones."""
        return bool(self.sample_seqs)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst), done before the step
    # Requests that ended since the last step: the runner drops its own state of
    # them (sampling generators), so nothing else has to call into the runner.
    finished_req_ids: set[str] = field(default_factory=set)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.finished_req_ids: set[str] = set()  # since the last schedule()

    # --- queue ----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of whichever queue holds it and free its blocks at once."""
        if request.status is RequestStatus.FINISHED:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv_cache.free(request.request_id)
        self.finished_req_ids.add(request.request_id)

    # --- one step -------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kv = self.kv_cache

        # Running requests first, oldest admission first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            while not kv.allocate_slots(req.request_id, req.num_computed_tokens, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(self.scheduled(req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left to run

        # Then waiting requests, in arrival order, while seats, tokens and
        # blocks last. Not after a preemption: blocks are short this step.
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                # A new (or preempted) request starts from its longest cached prefix; one that asks for
                # prompt logprobs computes its whole prompt (a cached block has keys, not logits).
                wants_logits = getattr(req.sampling_params, "prompt_logprobs", None) is not None
                hit = None if wants_logits else kv.find_cached_prefix(req.all_token_ids)
                num_hit = hit.num_tokens if hit is not None else 0
                n = min(req.num_tokens - num_hit, budget)
                if not kv.allocate_slots(req.request_id, num_hit, n, hit):
                    break  # first come, first served: no overtaking when blocks are short
                kv.record_lookup(req.num_tokens, num_hit)
                req.num_computed_tokens = num_hit
                req.num_cached_tokens = max(req.num_cached_tokens, num_hit)
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(self.scheduled(req, n))
                budget -= n

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        out.block_copies = kv.take_copies()
        out.finished_req_ids = self.take_finished_req_ids()
        return out

    def scheduled(self, req: Request, num_new_tokens: int) -> ScheduledRequest:
        """The request's share of this step (its slots allocated): which tokens it computes, and who samples after."""
        start = req.num_computed_tokens
        if start + num_new_tokens < req.num_tokens:
            seqs: tuple[Request, ...] = ()
        else:
            seqs = tuple(req.children) if req.children else (req,)
        return ScheduledRequest(req, start, num_new_tokens, self.kv_cache.get_block_tables(req.request_id), seqs)

    def take_finished_req_ids(self) -> set[str]:
        """Requests ended since the last call, for the runner to drop their state."""
        ids, self.finished_req_ids = self.finished_req_ids, set()
        return ids

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The step ran: its tokens are now in the KV cache, and its full blocks can be shared."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv_cache.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def update(self, sampled: list[tuple[Request, int]]) -> list[FinishReason | None]:
        """Append each sequence's sampled token (after update_after_step); return why each one finished, or None.

        The first token of a child is where its parent's prompt is done: the
        parent forks, its children take over its blocks and its place in the
        batch, and it leaves. A sequence that stops here (EOS, a stop token id,
        its grammar's end, max_tokens, the model's context) is freed at once.
        Stop strings are the frontend's.
        """
        reasons = []
        for seq, token in sampled:
            parent = seq.parent
            if parent is not None and not parent.is_finished:
                self._fork(parent)
            reasons.append(self._append_token(seq, token))
        return reasons

    def fork(self, parent: Request, children: list[Request]) -> None:
        """Children that share every block the running parent has computed join the batch right after it."""
        idx = self.running.index(parent)
        for child in children:
            self.kv_cache.fork(parent.request_id, child.request_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
        self.running[idx + 1 : idx + 1] = children

    def _fork(self, parent: Request) -> None:
        """A prompt is done: its n completions take over its blocks and its place in the batch, and it leaves."""
        self.fork(parent, parent.children)
        self.finish_request(parent, FinishReason.STOP)  # its prompt is done; its completions are the children's

    def _append_token(self, req: Request, token: int) -> FinishReason | None:
        params = req.sampling_params
        req.append_output_token(token)
        n = req.num_output_tokens
        reason = None
        if n >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                reason = FinishReason.STOP
            elif token in params.stop_token_ids:
                reason, req.stop_reason = FinishReason.STOP, token
        if reason is None and req.grammar is not None and req.grammar.is_terminated:
            reason = FinishReason.STOP  # the grammar is complete and took its stop token: nothing may follow
        if reason is None and (
            (params.max_tokens is not None and n >= params.max_tokens) or req.num_tokens >= self.config.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self.finish_request(req, reason)
        return reason
