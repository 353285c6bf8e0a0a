"""Beam search over HTTP (use_beam_search), driven from the frontend as vLLM's server does it.

The offline beam search (engine/beam_search.py) steps the core itself, so it
needs an idle engine; a server never has one. Here each step submits one
ordinary request per live beam through the async engine: the beam's prompt
and tokens so far, max_tokens=1, greedy, asking for the top candidates'
logprobs. The prefix cache holds the shared prefix's full blocks, so a step
recomputes at most a block's worth of tokens per beam, and other clients'
requests are batched with the beams as usual.

Which candidates survive follows the offline search (and so Hugging Face
transformers' beam search, do_sample=False) rule for rule, so the two return
the same sequences: the top 2 * beam_width candidates (more when several EOS
tokens could take them all) by cumulative logprob; those that end (EOS, or
the length limit) among the top beam_width join the finished hypotheses,
scored cum_logprob / generated_len ** length_penalty; the best beam_width
that did not end run on; the search stops when no running beam can still
beat the worst finished one (early_stopping=False), when beam_width are
finished (True), or at the length limit. vLLM's own frontend ranks more
simply; matching the offline search here keeps one definition of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.engine.beam_search import BeamSearchParams
from pagedllm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.entrypoints.server.errors import APIError, bad_request
from pagedllm.entrypoints.server.protocol import SamplingRequest
from pagedllm.entrypoints.server.streaming import merge
from pagedllm.sampling_params import SamplingParams

# Sampling fields that a deterministic beam search has no use for, with the values that mean "not used".
_NO_EFFECT = {
    "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0), "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0), "repetition_penalty": (None, 1.0), "min_tokens": (None, 0),
    "stop": (None, [], ""), "stop_token_ids": (None, []), "include_stop_str_in_output": (None, False),
    "prompt_logprobs": (None,), "logprob_token_ids": (None,),
    # Grammars and logits processors would need each beam's own state: not with beam search (nor in vLLM's).
    "logit_bias": (None, {}), "allowed_token_ids": (None,), "bad_words": (None, []), "structured_outputs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "tools": (None, []),
}


def beam_params(body: SamplingRequest, max_tokens: int) -> BeamSearchParams | None:
    """The request's beam search settings (None without use_beam_search); a 400 for what it cannot honour."""
    if not body.use_beam_search:
        for name in ("length_penalty", "early_stopping"):
            if getattr(body, name) is not None:
                raise bad_request(f"{name} applies only to beam search: set use_beam_search to true, or drop {name}", name)
        return None
    if body.stream:
        raise bad_request("streaming is not supported with use_beam_search (the best beams are known only at the end)",
                          "stream", "unsupported_parameter")
    if body.temperature not in (None, 0, 0.0):
        raise bad_request(f"beam search here is deterministic: temperature must be 0 or absent, got {body.temperature}",
                          "temperature")
    for name, unused in _NO_EFFECT.items():
        if getattr(body, name, None) not in unused:
            raise bad_request(f"{name} cannot be used with use_beam_search, which ranks beams by logprob alone: drop it",
                              name, "unsupported_parameter")
    if (getattr(body, "response_format", None) or {}).get("type", "text") != "text":
        raise bad_request("response_format cannot be used with use_beam_search: drop one", "response_format", "unsupported_parameter")
    try:
        return BeamSearchParams(
            beam_width=body.n or 1, max_tokens=max_tokens, ignore_eos=bool(body.ignore_eos),
            length_penalty=1.0 if body.length_penalty is None else body.length_penalty,
            early_stopping=False if body.early_stopping is None else body.early_stopping,
        )
    except ValueError as exc:
        message = str(exc).replace("beam_width", "n (the beam width)", 1)
        raise bad_request(message, "n" if str(exc).startswith("beam_width") else None) from None


def num_candidates(params: BeamSearchParams, num_eos: int) -> int:
    """As the offline search: enough that beam_width survive even if every beam proposes each EOS token."""
    return max(2, 1 + (0 if params.ignore_eos else num_eos)) * params.beam_width


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    score: float  # cumulative logprob
    logprobs: list[dict[int, Logprob]]  # one entry per generated token


@dataclass
class _Finished:
    score: float  # cum_logprob / len ** length_penalty
    beam: _Beam
    ended_with_eos: bool


@dataclass
class BeamSelection:
    """The choosing half of beam search, with no engine: feed it each step's proposals."""

    params: BeamSearchParams
    eos: frozenset[int]
    prompt_len: int
    max_model_len: int
    k: int  # candidates considered per step
    running: list[_Beam] = field(default_factory=lambda: [_Beam([], 0.0, [])])
    finished: list[_Finished] = field(default_factory=list)
    improvable: bool = True
    done: bool = False

    def step(self, proposals: list[dict[int, Logprob]]) -> None:
        """proposals[b]: the logprob entry (the top k tokens by rank) of running beam b's next token."""
        p, width = self.params, self.params.beam_width
        candidates = []  # (cumulative logprob, beam index, token)
        for b, (beam, entry) in enumerate(zip(self.running, proposals)):
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None)[: self.k]
            candidates.extend((beam.score + value, b, t) for _, t, value in ranked)
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        candidates = candidates[: self.k]
        gen_len = len(self.running[0].tokens) + 1
        at_limit = gen_len >= p.max_tokens or self.prompt_len + gen_len >= self.max_model_len
        ends = [at_limit or c[2] in self.eos for c in candidates]

        def extend(c) -> _Beam:
            beam = self.running[c[1]]
            return _Beam(beam.tokens + [c[2]], c[0], beam.logprobs + [proposals[c[1]]])

        full = p.early_stopping is True and len(self.finished) == width
        if self.improvable and not full:
            for rank, (c, end) in enumerate(zip(candidates, ends)):
                if end and rank < width:
                    self.finished.append(_Finished(c[0] / (gen_len**p.length_penalty), extend(c), c[2] in self.eos))
            self.finished.sort(key=lambda f: -f.score)
            del self.finished[width:]

        survivors = [c for c, end in zip(candidates, ends) if not end][:width]
        self.running = [] if at_limit else [extend(c) for c in survivors]
        if self.running:
            best_len = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0.0 else gen_len
            best_possible = self.running[0].score / (best_len**p.length_penalty)
            if len(self.finished) == width and best_possible <= self.finished[-1].score:
                self.improvable = False
        all_full = p.early_stopping is True and len(self.finished) == width
        self.done = at_limit or not self.improvable or all_full or not self.running


async def beam_search(state, request, params: BeamSearchParams, keep_logprobs: bool) -> RequestOutput:
    """The beam_width best sequences for one engine request's prompt, best first, as one RequestOutput."""
    eos = frozenset(state.engine.engine.eos_token_ids)
    k = num_candidates(params, len(eos))
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    step_params.logprobs = k  # past the user-facing cap of 20, as the offline search does: internal only
    prompt = list(request.prompt_token_ids)
    search = BeamSelection(params, eos, len(prompt), state.max_model_len, k)
    cached, step = 0, 0
    while not search.done:
        requests = [
            state.engine.make_request({"prompt_token_ids": prompt + beam.tokens}, step_params, f"{request.request_id}-s{step}-b{b}")
            for b, beam in enumerate(search.running)
        ]
        outs: list[RequestOutput | None] = [None] * len(requests)
        async for i, out in merge([state.engine.generate(r, final_only=True) for r in requests]):
            outs[i] = out
        for out in outs:
            if out is None or out.error or not out.outputs[0].logprobs:
                raise APIError(500, f"beam search step failed: {getattr(out, 'error', None) or 'no output'}", code="internal_error")
        if step == 0:
            cached = int(outs[0].metrics.get("num_cached_tokens", 0) or 0)
        search.step([out.outputs[0].logprobs[0] for out in outs])
        step += 1
    completions = [
        CompletionOutput(
            index=i, text=state.tokenizer.decode(f.beam.tokens, skip_special_tokens=True), token_ids=f.beam.tokens,
            cumulative_logprob=f.beam.score, logprobs=f.beam.logprobs if keep_logprobs else None,
            finish_reason="stop" if f.ended_with_eos else "length",
        )
        for i, f in enumerate(search.finished)
    ]
    return RequestOutput(request.request_id, request.prompt, prompt, completions, True,
                         metrics={"num_cached_tokens": cached})
