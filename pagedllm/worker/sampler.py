"""Logits -> next tokens (and logprobs), for a whole batch at once.

This runs every decode step over up to hundreds of rows of a ~50k vocabulary
on a small CPU, so every stage works on the batch as one tensor and is skipped
when no row asks for it; the only per-row Python is one uniform draw for each
seeded row. Semantics follow vLLM: logprobs come from the raw logits; then
min_tokens, repetition, frequency and presence penalties; greedy rows take the
argmax; random rows apply temperature, top-k, top-p and min-p, then sample.
logit_bias, allowed_token_ids and bad_words change the logits with the
penalties, after the logprobs are taken (vLLM's order too).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from pagedllm.kernels.cpu import ops as cpu_ops
from pagedllm.sampling_params import NothingToSample, SamplingParams

# Top-p first looks for its cut-off among this many best tokens per row, then
# among more, and sorts the whole row only when those do not hold top_p of
# the mass: a full sort of a 50k vocabulary is far slower than a small top-k,
# and model distributions almost always reach top_p within a few hundred tokens.
_TOP_P_CANDIDATES = (64, 1024)


@dataclass
class SamplingRow:
    """One sequence whose next token is sampled this step."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Set when params.seed is not None; created and kept by the caller for the
    # request's lifetime, so a seeded request replays exactly.
    generator: torch.Generator | None
    eos_token_ids: Sequence[int]


@dataclass
class TokenLogprobs:
    token_id: int  # the sampled token
    logprob: float
    rank: int  # 1-based: 1 + number of tokens strictly more likely
    top_ids: list[int]  # the params.logprobs most likely tokens, best first
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows, vocab] with num_rows={len(rows)}, "
                f"got shape {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        params = [r.params for r in rows]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        blocked = _min_tokens_blocked(rows, vocab) + [(i, t) for i, t in _bad_words_blocked(rows) if t < vocab]
        proc_rows = [i for i, p in enumerate(params) if p.logit_bias or p.allowed_token_ids]

        # The common decode step: everything greedy and plain.
        if not (lp_rows or pen_rows or random_rows or blocked or proc_rows):
            return SamplerOutput(_argmax(logits).tolist(), [None] * num_rows)

        raw_logprobs = None
        if lp_rows:
            raw_logprobs = torch.log_softmax(_rows(logits, lp_rows), dim=-1, dtype=torch.float32)

        x = logits
        if blocked or pen_rows or proc_rows:
            x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            if proc_rows:
                _apply_bias_and_allowed(x, params, proc_rows)
            if blocked:
                r_idx, t_idx = zip(*blocked)
                x[list(r_idx), list(t_idx)] = float("-inf")
            if pen_rows:
                _apply_penalties(x, rows, pen_rows)

        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        if not random_rows:
            tokens = _argmax(x)
        else:
            tokens = torch.empty(num_rows, dtype=torch.long, device=logits.device)
            if greedy_rows:
                tokens[greedy_rows] = x[greedy_rows].argmax(dim=-1)
            tokens[random_rows] = _sample_random(
                _rows(x, random_rows), [rows[i] for i in random_rows])
        # Masks were applied: a greedy row whose every token is masked has none to choose.
        if x is not logits and greedy_rows and bool((x[greedy_rows, tokens[greedy_rows]] == float("-inf")).any()):
            raise NothingToSample()
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if raw_logprobs is not None:
            for i, entry in zip(lp_rows, gather_logprobs(
                    raw_logprobs, tokens[lp_rows], [params[i].logprobs for i in lp_rows],
                    [params[i].logprob_token_ids for i in lp_rows])):
                logprobs[i] = entry
        return SamplerOutput(token_list, logprobs)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """The greedy token of each row; on the CPU by the native kernel, faster than torch's at decode batch sizes."""
    if x.dtype == torch.float32 and x.stride(-1) == 1 and x.shape[-1] > 0 and cpu_ops.available(x):
        return cpu_ops.argmax(x)
    return x.argmax(dim=-1)


def _min_tokens_blocked(rows: list[SamplingRow], vocab: int) -> list[tuple[int, int]]:
    """(row, token) pairs that may not be sampled yet: a sequence shorter than
    min_tokens must not stop, so its stop tokens (and EOS unless ignored) are out."""
    blocked = []
    for i, r in enumerate(rows):
        p = r.params
        if p.min_tokens and len(r.output_token_ids) < p.min_tokens:
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(r.eos_token_ids)
            blocked.extend((i, t) for t in stops if 0 <= t < vocab)
    return blocked


def _bad_words_blocked(rows: list[SamplingRow]) -> list[tuple[int, int]]:
    """(row, token) pairs that would complete a bad word: its last token, once the output ends with the rest of it."""
    blocked = []
    for i, r in enumerate(rows):
        for word in r.params.bad_words_token_ids or ():
            *head, last = word
            out = r.output_token_ids
            if not head or (len(out) >= len(head) and list(out[len(out) - len(head):]) == head):
                blocked.append((i, last))
    return blocked


def _apply_bias_and_allowed(x: torch.Tensor, params: list[SamplingParams], idx: list[int]) -> None:
    """logit_bias added, and every token outside allowed_token_ids set to -inf, in place on rows idx."""
    for i in idx:
        p = params[i]
        if p.allowed_token_ids:
            keep = torch.tensor(p.allowed_token_ids, dtype=torch.long, device=x.device)
            kept = x[i, keep]
            x[i].fill_(float("-inf"))
            x[i, keep] = kept
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=x.device)
            x[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=x.device)


def _flat_token_index(seqs: list[Sequence[int]], row_ids: list[int], vocab: int,
                      device) -> torch.Tensor:
    """Indices into the flattened [rows, vocab] logits, one per token of each
    sequence, so a whole batch's penalties are one sparse update. Ids outside
    the logits' vocabulary (a tokenizer larger than the model's head) are
    dropped: they would otherwise land in the next row."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
    base = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long) * vocab, lengths)
    valid = (ids >= 0) & (ids < vocab)
    if not bool(valid.all()):
        base, ids = base[valid], ids[valid]
    return (base + ids).to(device)


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties,
    in place on rows `idx` of the contiguous float32 x. Only the logits of
    tokens that occurred change, so this touches those alone, never the vocab."""
    vocab = x.shape[1]
    flat_x = x.view(-1)
    per_row = lambda vals: torch.tensor(vals, dtype=torch.float32, device=x.device)
    ps = [rows[i].params for i in idx]
    out_flat = _flat_token_index([rows[i].output_token_ids for i in idx], idx, vocab, x.device)

    if any(p.repetition_penalty != 1.0 for p in ps):
        rep = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        rep[idx] = per_row([p.repetition_penalty for p in ps])
        prompt_flat = _flat_token_index(
            [rows[i].prompt_token_ids for i in idx], idx, vocab, x.device)
        seen = torch.unique(torch.cat([out_flat, prompt_flat]))
        # A penalty that float32 rounds to 0 or inf (1e-300, 1e300) would make
        # these logits inf or NaN, and the row's softmax NaN: the penalty and
        # the penalised logits stay finite (a logit at the float32 maximum
        # takes the row's whole mass, as the penalty asks).
        top = torch.finfo(torch.float32).max
        vals, r = flat_x[seen], rep[seen // vocab].clamp(torch.finfo(torch.float32).tiny, top)
        flat_x[seen] = torch.where(vals > 0, vals / r, vals * r).clamp(-top, top)

    if any(p.frequency_penalty or p.presence_penalty for p in ps):
        freq = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        pres = torch.zeros_like(freq)
        freq[idx] = per_row([p.frequency_penalty for p in ps])
        pres[idx] = per_row([p.presence_penalty for p in ps])
        seen, counts = torch.unique(out_flat, return_counts=True)
        row = seen // vocab
        flat_x[seen] -= freq[row] * counts + pres[row]


def _sample_random(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row."""
    ps = [r.params for r in rows]
    temps = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=x.device)
    # Out of place: x may be the caller's logits; this also makes the float32 copy.
    x = torch.div(x, temps.unsqueeze(1))
    vocab = x.shape[1]

    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in ps]
    top_k_vals = None
    if any(ks):
        top_k_vals = _apply_top_k(x, ks)
    if any(p.top_p < 1.0 for p in ps):
        _apply_top_p(x, [p.top_p for p in ps], ks, top_k_vals)

    probs = torch.softmax(x, dim=-1)
    if any(p.min_p > 0 for p in ps):
        min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=x.device)
        cut = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        probs.masked_fill_(probs < cut, 0.0)
    tokens = _inverse_cdf_sample(probs, _uniforms(rows, x.device))
    # A row with no token to draw (every logit -inf, or NaN) lands past the
    # vocabulary: its request fails instead (the runner samples the rows alone to find it).
    bad = (tokens >= vocab).nonzero().flatten().tolist()
    if bad:
        raise NothingToSample(not_numbers=bool(x[bad[0]].isnan().any()))
    return tokens


def _apply_top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mask all but each row's k best (ks[i] == 0: row untouched). Returns the
    kmax best values per row, best first, which top-p can reuse."""
    kmax = max(ks)
    vals = x.topk(kmax, dim=-1).values
    k = torch.tensor(ks, device=x.device)
    thresh = vals.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    thresh[k == 0] = float("-inf")
    x.masked_fill_(x < thresh, float("-inf"))
    return vals


def _apply_top_p(x: torch.Tensor, top_ps: list[float], ks: list[int],
                 top_k_vals: torch.Tensor | None) -> None:
    """Keep the smallest set of best tokens whose probability reaches top_p
    (the token that crosses it included), by finding each row's cut-off value."""
    vocab = x.shape[1]
    rows = [i for i, p in enumerate(top_ps) if p < 1.0]
    thresh = torch.full((x.shape[0], 1), float("-inf"), device=x.device)

    # Rows with top-k hold every token still allowed in top_k_vals already.
    with_k = [i for i in rows if ks[i]]
    if with_k:
        cand = top_k_vals[with_k]
        k = torch.tensor([ks[i] for i in with_k], device=x.device)
        pos = torch.arange(cand.shape[1], device=x.device)
        cand = cand.masked_fill(pos >= k.unsqueeze(1), float("-inf"))
        t, _ = _top_p_cutoff(cand, torch.logsumexp(cand, dim=-1), top_ps, with_k)
        thresh[with_k] = t

    todo = [i for i in rows if not ks[i]]
    if todo:
        lse_of = dict(zip(todo, _rows(x, todo).logsumexp(dim=-1).unbind(0)))
    for n in (*_TOP_P_CANDIDATES, vocab):
        if not todo:
            break
        n = min(n, vocab)
        cand = _rows(x, todo).topk(n, dim=-1).values
        t, covered = _top_p_cutoff(cand, torch.stack([lse_of[i] for i in todo]), top_ps, todo)
        if n == vocab:
            covered = torch.ones_like(covered)
        is_done = covered.tolist()
        thresh[[i for i, c in zip(todo, is_done) if c]] = t[covered]
        todo = [i for i, c in zip(todo, is_done) if not c]
    x.masked_fill_(x < thresh, float("-inf"))


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] without the copy when idx is every row."""
    return x if len(idx) == x.shape[0] else x[idx]


def _top_p_cutoff(cand: torch.Tensor, lse: torch.Tensor, top_ps: list[float],
                  rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's best candidates (sorted, best first) and the log of its
    full softmax normaliser: the smallest kept value, and whether the
    candidates held enough mass for that cut-off to be exact."""
    probs = torch.exp(cand - lse.unsqueeze(1))
    cum = probs.cumsum(dim=-1)
    p = torch.tensor([top_ps[i] for i in rows], dtype=torch.float32, device=cand.device)
    # Keep a token while the mass before it is below top_p; the best always stays.
    keep = (cum - probs) < p.unsqueeze(1)
    num_keep = keep.sum(dim=-1).clamp(min=1)
    covered = cum[:, -1] >= p
    return cand.gather(1, (num_keep - 1).unsqueeze(1)), covered


def _uniforms(rows: list[SamplingRow], device) -> torch.Tensor:
    """One uniform in [0, 1) per row. Seeded rows draw from their own
    generator only, so their tokens do not depend on their batch mates."""
    u = torch.empty(len(rows), dtype=torch.float32)
    unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded))
    for i, r in enumerate(rows):
        if r.params.seed is not None:
            if r.generator is None:
                raise ValueError(
                    f"row {i} has seed={r.params.seed} but no generator; the caller "
                    "must create one per seeded request and keep it")
            u[i] = torch.rand(1, generator=r.generator, device=r.generator.device).item()
    return u.to(device)


def _inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample each row of (unnormalised) probs with its uniform u: one cumsum
    and a binary search, instead of a [rows, vocab] block of random numbers.
    A token with zero probability adds nothing to the cumsum, so it is never
    the first index whose cumulative mass exceeds u."""
    cdf = probs.cumsum_(dim=-1)
    total = cdf[:, -1:]
    target = u.unsqueeze(1) * total
    # rand < 1, but rounding of u * total could still reach total.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, nums: list[int],
                    chosen: list[list[int] | None] | None = None) -> list[TokenLogprobs]:
    """Each row's sampled token with its rank and the best nums[i] (-1: all); where chosen[i] is given, those token
    ids' logprobs, in that order, instead of the best (logprob_token_ids)."""
    chosen = chosen or [None] * len(nums)
    sampled = raw.gather(1, tokens.unsqueeze(1))
    ranks = ((raw > sampled).sum(dim=-1) + 1).tolist()
    vocab = raw.shape[-1]
    nums = [0 if ids is not None else vocab if n < 0 else n for n, ids in zip(nums, chosen)]  # -1: the whole vocabulary
    kmax = max(nums)
    if kmax:
        top_vals, top_ids = raw.topk(kmax, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    else:
        top_vals = top_ids = [[] for _ in nums]
    return [
        TokenLogprobs(token_id=t, logprob=lp, rank=rank, top_ids=ids[:n] if pick is None else list(pick),
                      top_logprobs=vals[:n] if pick is None else raw[i, pick].tolist())
        for i, (t, lp, rank, ids, vals, n, pick) in enumerate(zip(
            tokens.tolist(), sampled.squeeze(1).tolist(), ranks, top_ids, top_vals, nums, chosen))
    ]
