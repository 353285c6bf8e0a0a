"""Beam search on shared blocks, as the PagedAttention paper describes it.

Every step, each live beam computes one token and proposes its best
continuations; the best `beam_width` of them over the whole group survive.
A surviving parent's first child takes over the parent's sequence, further
children fork it (sharing every block through ref counts), and beams with no
surviving child die and give their blocks back at once. A child that writes
into a partly filled block it shares gets its own copy first (copy-on-write).

Selection follows Hugging Face transformers' beam search (do_sample=False), so
that both return the same best sequences: the top 2 * beam_width candidates
by cumulative log-probability; candidates that end (EOS, or the length limit)
among the top beam_width join the finished hypotheses with score
cum_logprob / generated_len ** length_penalty; the best beam_width that did
not end run on; and the search stops when no running beam can still beat the
worst finished one (early_stopping=False), when beam_width hypotheses are
finished (True), or at the length limit.

Beams are sequences of the scheduler: a group's prompt joins its queue, the
scheduler admits it and computes it (in chunks if it is long), and each step
schedules every running beam; a beam forks through Scheduler.fork (the KV cache
manager's fork: shared blocks) and dies through finish_request (its blocks
freed). Only the choice of tokens is beam search's. The groups step in lockstep:
a group chooses once all of its beams have their logits, so a group is handed
to the scheduler only while the worst case of every active group fits the pool
(no beam is ever preempted) and all their beams fit one step's token budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedllm.engine.request import FinishReason, Request
from pagedllm.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # beam search here is deterministic; kept for vLLM's signature
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # as transformers: False (heuristic), True, or "never"

    def __post_init__(self) -> None:
        for name, lo, hi in (("beam_width", 1, 64), ("max_tokens", 1, 1 << 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if self.temperature != 0.0:
            raise ValueError(f"temperature must be 0 for beam search (sampled beam search is not supported), got {self.temperature}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt and output
    output_token_ids: list[int]
    cum_logprob: float
    score: float  # cum_logprob / generated_len ** length_penalty: what the beams are ranked by
    text: str = ""  # filled in by the frontend, which has the tokenizer
    finish_reason: str = "length"  # "stop" when it ended with EOS


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Beam:
    seq: Request
    score: float  # cumulative log-probability


@dataclass
class _Group:
    index: int
    prompt: Request  # computes the prompt, then becomes the first beam
    params: BeamSearchParams
    running: list[_Beam] = field(default_factory=list)
    finished: list[tuple[float, list[int], float, bool]] = field(default_factory=list)  # (score, output, cum_logprob, eos)
    improvable: bool = True
    done: bool = False

    @property
    def prompt_len(self) -> int:
        return self.prompt.num_prompt_tokens


class BeamSearchRunner:
    def __init__(self, core) -> None:
        self.core = core
        self.scheduler = core.scheduler
        self.kv = core.kv_cache
        self._ids = itertools.count()

    def run(self, requests: list[Request], params: BeamSearchParams) -> list[BeamSearchOutput]:
        if self.scheduler.has_unfinished_requests():
            raise RuntimeError("beam search runs on an idle engine; finish or abort other requests first")
        internal = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True)
        internal.logprobs = self._num_candidates(params)  # may pass the user-facing cap of 20: internal only
        groups = []
        for i, req in enumerate(requests):
            need = self._worst_case_blocks(req.num_prompt_tokens, params)
            if need > self.kv.num_blocks:
                raise ValueError(
                    f"beam search with beam_width={params.beam_width} and max_tokens={params.max_tokens} on a "
                    f"{req.num_prompt_tokens}-token prompt may need {need} KV blocks; the pool has {self.kv.num_blocks}"
                )
            req.sampling_params = internal
            groups.append(_Group(i, req, params))
        token_budget = self.scheduler.config.max_num_batched_tokens
        if params.beam_width > token_budget:
            raise ValueError(f"beam_width={params.beam_width} is more than max_num_batched_tokens={token_budget}: "
                             f"every beam computes a token in every step")
        waiting = list(groups)
        active: list[_Group] = []
        try:
            while waiting or active:
                while waiting and self._admissible(waiting[0], active):
                    active.append(waiting.pop(0))
                    self.scheduler.add_request(active[-1].prompt)
                self._step(active)
                for g in [g for g in active if g.done]:
                    for beam in g.running:
                        self._free(beam.seq)
                    active.remove(g)
        except BaseException:
            for g in active:  # leave the scheduler idle, as it was found
                for seq in [g.prompt, *(b.seq for b in g.running)]:
                    self._free(seq)
            raise
        return [self._output(g) for g in groups]

    def _num_candidates(self, params: BeamSearchParams) -> int:
        """As transformers: enough candidates that beam_width survive even if every beam proposes each EOS."""
        num_eos = 0 if params.ignore_eos else len(self.core.eos_token_ids)
        return max(2, 1 + num_eos) * params.beam_width

    # --- admission --------------------------------------------------------
    def _worst_case_blocks(self, prompt_len: int, params: BeamSearchParams) -> int:
        per_beam = self.kv.max_blocks(prompt_len + params.max_tokens, prompt_len) + 1  # +1: a copy-on-write in flight
        return params.beam_width * per_beam

    def _admissible(self, group: _Group, active: list[_Group]) -> bool:
        blocks = sum(self._worst_case_blocks(g.prompt_len, g.params) for g in active + [group])
        seqs = sum(g.params.beam_width for g in active + [group])
        config = self.scheduler.config
        return not active or (blocks <= self.kv.num_blocks and seqs <= min(config.max_num_seqs, config.max_num_batched_tokens))

    # --- one lockstep step --------------------------------------------------
    def _step(self, active: list[_Group]) -> None:
        out = self.scheduler.schedule()
        if out.preempted or out.is_empty:
            raise RuntimeError("beam search ran out of KV blocks despite its admission check")
        results = self.core.runner.execute(out).sampled
        failed = [e for _, e in results if isinstance(e, Exception)]
        if failed:
            raise failed[0]
        self.scheduler.update_after_step(out)
        proposals = {seq.request_id: sampled.logprobs for seq, sampled in results}
        for g in active:
            beams = g.running or ([_Beam(g.prompt, 0.0)] if g.prompt.request_id in proposals else [])
            if beams:
                self._select(g, beams, proposals)

    # --- choosing the next beams ------------------------------------------
    def _select(self, g: _Group, beams: list[_Beam], proposals: dict) -> None:
        p = g.params
        width, k = p.beam_width, self._num_candidates(p)
        eos = set() if p.ignore_eos else set(self.core.eos_token_ids)
        candidates = []  # (cumulative logprob, beam index, token, logprob)
        for b, beam in enumerate(beams):
            lp = proposals[beam.seq.request_id]
            for tok, value in zip(lp.top_ids[:k], lp.top_logprobs[:k]):
                candidates.append((beam.score + value, b, tok, value))
        # Best first; ties in the order of the flattened (beam, token) scores, as a top-k over them gives.
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        candidates = candidates[:k]
        gen_len = beams[0].seq.num_output_tokens + 1  # tokens generated once this step's token is added
        at_limit = gen_len >= p.max_tokens or beams[0].seq.num_tokens + 1 >= self.core.max_model_len
        ends = [at_limit or c[2] in eos for c in candidates]

        # Finished hypotheses: candidates that end, among the top beam_width.
        full = p.early_stopping is True and len(g.finished) == width
        if g.improvable and not full:
            for rank, (c, end) in enumerate(zip(candidates, ends)):
                if end and rank < width:
                    b, tok = c[1], c[2]
                    output = beams[b].seq.output_token_ids + [tok]
                    g.finished.append((c[0] / (gen_len**p.length_penalty), output, c[0], tok in eos))
            g.finished.sort(key=lambda f: -f[0])
            del g.finished[width:]

        # Running beams: the best beam_width candidates that did not end.
        survivors = [c for c, end in zip(candidates, ends) if not end][:width]
        g.running = self._advance(beams, survivors) if not at_limit else self._advance(beams, [])

        # Stop when nothing can improve (transformers' early-stopping heuristic), or at the limit.
        if g.running:
            if p.early_stopping == "never" and p.length_penalty > 0.0:
                best_len = p.max_tokens
            else:
                best_len = gen_len
            best_possible = g.running[0].score / (best_len**p.length_penalty)
            if len(g.finished) == width and best_possible <= g.finished[-1][0]:
                g.improvable = False
        all_full = p.early_stopping is True and len(g.finished) == width
        g.done = at_limit or not g.improvable or all_full or not g.running

    def _advance(self, beams: list[_Beam], survivors: list) -> list[_Beam]:
        """Fork, extend and free: each surviving (beam, token) becomes a running beam."""
        children: dict[int, list] = {}
        for c in survivors:
            children.setdefault(c[1], []).append(c)
        new_running: list[tuple[float, int, _Beam]] = []
        for b, beam in enumerate(beams):
            picks = children.get(b)
            if not picks:
                self._free(beam.seq)  # no child survives: its blocks go back now
                continue
            # Extra children fork the parent before the parent itself moves on.
            for c in picks[1:]:
                child = self._fork(beam.seq)
                child.append_output_token(c[2])
                new_running.append((c[0], survivors.index(c), _Beam(child, c[0])))
            beam.seq.append_output_token(picks[0][2])
            beam.score = picks[0][0]
            new_running.append((picks[0][0], survivors.index(picks[0]), beam))
        new_running.sort(key=lambda t: t[1])  # best first, as the candidates were ranked
        return [t[2] for t in new_running]

    def _fork(self, seq: Request) -> Request:
        child = Request(f"{seq.request_id}/{next(self._ids)}", seq.prompt_token_ids, seq.sampling_params,
                        eos_token_ids=seq.eos_token_ids)
        child.output_token_ids = list(seq.output_token_ids)
        child.all_token_ids = list(seq.all_token_ids)
        self.scheduler.fork(seq, [child])
        return child

    def _free(self, seq: Request) -> None:
        self.scheduler.finish_request(seq, FinishReason.STOP)  # out of the batch, its blocks back at once

    def _output(self, g: _Group) -> BeamSearchOutput:
        seqs = []
        for score, output, cum, ended_with_eos in g.finished:
            seqs.append(BeamSearchSequence(
                tokens=g.prompt.prompt_token_ids + output, output_token_ids=output, cum_logprob=cum, score=score,
                finish_reason="stop" if ended_with_eos else "length",
            ))
        return BeamSearchOutput(list(g.prompt.prompt_token_ids), seqs)
