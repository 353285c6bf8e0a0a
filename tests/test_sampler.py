import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.sampling_params import NothingToSample, SamplingParams
from pagedllm.worker.sampler import (
    Sampler, SamplingRow, _apply_penalties, _apply_top_p)

EOS = 2
sampler = Sampler()


def row(prompt=(5, 6), output=(), generator=None, **kw) -> SamplingRow:
    params = SamplingParams(**kw)
    if params.seed is not None and generator is None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, [EOS])


def counts(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def test_greedy_is_argmax_any_dtype():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1).tolist()
    for x in (logits, logits.bfloat16(), logits.half(), logits.t().contiguous().t()):
        out = sampler(x, [row(temperature=0) for _ in range(8)])
        assert out.token_ids == x.argmax(-1).tolist()
        assert out.logprobs == [None] * 8
    assert sampler(logits, [row(temperature=0) for _ in range(8)]).token_ids == want


def test_caller_logits_not_modified():
    logits = torch.randn(3, 50)
    before = logits.clone()
    rows = [row(temperature=0.7, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.5,
                frequency_penalty=1, output=[1, 1, 3], min_tokens=5, logprobs=2)] * 3
    sampler(logits, rows)
    assert torch.equal(logits, before)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(1)) * 2
    want = logits.argmax(-1).tolist()
    assert sampler(logits, [row(top_k=1) for _ in range(16)]).token_ids == want
    assert sampler(logits, [row(top_p=1e-6) for _ in range(16)]).token_ids == want
    assert sampler(logits, [row(min_p=1.0) for _ in range(16)]).token_ids == want
    assert sampler(logits, [row(temperature=1e-6) for _ in range(16)]).token_ids == want


def sample_many(logit_row, n=20000, **kw):
    torch.manual_seed(1234)
    logits = torch.tensor(logit_row, dtype=torch.float32).expand(n, -1).contiguous()
    return counts(sampler(logits, [row(**kw)] * n).token_ids, len(logit_row))


def test_temperature_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for temp in (1.0, 0.5, 2.0):
        freq = sample_many(p.log().tolist(), temperature=temp)
        want = p.pow(1 / temp) / p.pow(1 / temp).sum()
        assert torch.allclose(freq, want.double(), atol=0.015), (temp, freq, want)


def test_top_k_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    freq = sample_many(p.log().tolist(), top_k=2)
    assert torch.allclose(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]).double(), atol=0.015)


def test_top_p_distribution():
    # Sorted: 0.4, 0.3 (mass before it 0.4 < 0.5: kept), 0.2 (0.7: dropped).
    p = torch.tensor([0.2, 0.4, 0.1, 0.3])
    freq = sample_many(p.log().tolist(), top_p=0.5)
    assert torch.allclose(freq, torch.tensor([0, 4 / 7, 0, 3 / 7]).double(), atol=0.015)
    # With top-k first: top_k=3 leaves 0.4, 0.3, 0.2 -> renormalised 4/9, 3/9, 2/9;
    # top_p=0.7 keeps 4/9 and 3/9 (mass before 3/9 is 0.44 < 0.7, before 2/9 0.78).
    freq = sample_many(p.log().tolist(), top_k=3, top_p=0.7)
    assert torch.allclose(freq, torch.tensor([0, 4 / 7, 0, 3 / 7]).double(), atol=0.015)


def test_min_p_distribution():
    # max prob 0.5, min_p 0.5 -> keep p >= 0.25: tokens 0 and 1.
    p = torch.tensor([0.5, 0.3, 0.12, 0.08])
    freq = sample_many(p.log().tolist(), min_p=0.5)
    assert torch.allclose(freq, torch.tensor([5 / 8, 3 / 8, 0, 0]).double(), atol=0.015)


def reference_top_p_mask(x: torch.Tensor, top_p: float) -> torch.Tensor:
    vals, order = x.sort(descending=True)
    probs = vals.double().softmax(-1)
    keep_sorted = (probs.cumsum(-1) - probs) < top_p
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


@pytest.mark.parametrize("scale", [30.0, 3.0, 0.3, 0.001])
def test_top_p_matches_full_sort(scale):
    """Peaked rows resolve among few candidates, flat ones need the full sort:
    every path must keep exactly the tokens a full sort keeps."""
    vocab = 3000
    x = torch.randn(4, vocab, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    top_ps = [0.9, 0.5, 0.99, 1.0]
    got = x.clone()
    _apply_top_p(got, top_ps, [0] * 4, None)
    for i, p in enumerate(top_ps):
        want = reference_top_p_mask(x[i], p) if p < 1 else torch.ones(vocab, dtype=torch.bool)
        assert torch.equal(got[i].isfinite(), want), (scale, p)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), top_k=st.integers(0, 40), top_p=st.floats(0.05, 1.0),
       min_p=st.floats(0.0, 0.9), temperature=st.floats(0.1, 3.0))
def test_sampled_token_is_always_allowed(seed, top_k, top_p, min_p, temperature):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 200, generator=gen) * 4
    r = row(seed=seed, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
    token = sampler(x, [r]).token_ids[0]
    # Reference filters, one at a time, on the tempered row.
    t = x[0] / temperature
    allowed = torch.ones(200, dtype=torch.bool)
    if top_k:
        allowed &= t >= t.topk(top_k).values[-1]
    t = t.masked_fill(~allowed, -math.inf)
    if top_p < 1:
        allowed &= reference_top_p_mask(t, top_p)
    probs = t.masked_fill(~allowed, -math.inf).softmax(-1)
    allowed &= probs >= min_p * probs.max()
    assert allowed[token]


def test_penalties_on_hand_made_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    r = row(prompt=[0], output=[1, 1, 3], repetition_penalty=2.0,
            frequency_penalty=0.5, presence_penalty=0.25)
    x = logits.clone()
    _apply_penalties(x, [r], [0])
    # repetition over prompt+output (0, 1, 3): positive / 2, negative * 2;
    # then output counts {1: 2, 3: 1}: minus 0.5 * count + 0.25 * present.
    want = torch.tensor([[1.0, -4.0 - 1.0 - 0.25, 1.0, 0.25 - 0.5 - 0.25, 3.0]])
    assert torch.allclose(x, want)


def test_penalties_only_touch_their_rows():
    logits = torch.randn(3, 10)
    rows = [row(output=[1, 2]), row(output=[1, 2], frequency_penalty=1.0), row(output=[4])]
    x = logits.clone()
    _apply_penalties(x, rows, [1])
    assert torch.equal(x[0], logits[0]) and torch.equal(x[2], logits[2])
    assert torch.allclose(x[1, [1, 2]], logits[1, [1, 2]] - 1)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]] * 4)
    rows = [
        row(temperature=0, prompt=[0]),
        row(temperature=0, prompt=[1], repetition_penalty=2.0),  # 5 -> 2.5 < 4
        row(temperature=0, prompt=[0], output=[1, 1], frequency_penalty=0.6),  # 5 -> 3.8
        row(temperature=0, prompt=[0], output=[1], presence_penalty=1.5),  # 5 -> 3.5
    ]
    assert sampler(logits, rows).token_ids == [1, 2, 2, 2]


def test_penalties_ignore_ids_outside_vocab():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    x = logits.clone()
    # Id 4 in row 0 would be flat index 4, i.e. row 1's token 1, if not dropped.
    _apply_penalties(x, [row(prompt=[4], output=[4], repetition_penalty=2.0,
                             frequency_penalty=1.0), row()], [0])
    assert torch.equal(x, logits)


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0]])  # EOS=2 best, then 3, then 4
    kw = dict(temperature=0, min_tokens=3, stop_token_ids=[3])
    assert sampler(logits, [row(output=[0], **kw)]).token_ids == [4]
    assert sampler(logits, [row(output=[0], ignore_eos=True, **kw)]).token_ids == [EOS]
    assert sampler(logits, [row(output=[0, 0, 0], **kw)]).token_ids == [EOS]
    # And for random rows: never EOS or 3 while blocked.
    many = [row(output=[0], min_tokens=3, stop_token_ids=[3])] * 500
    tokens = sampler(logits.expand(500, -1), many).token_ids
    assert set(tokens) <= {0, 1, 4}


def test_logprobs_from_raw_logits_with_rank():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 300, generator=gen)
    rows = [
        row(temperature=0.8, top_k=50, repetition_penalty=1.3, output=[7, 8], logprobs=5),
        row(temperature=0, logprobs=0),
        row(temperature=0.5),
    ]
    out = sampler(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for i in (0, 1):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(raw[i, tok].item(), abs=1e-5)
        assert lp.rank == int((raw[i] > raw[i, tok]).sum()) + 1
        n = rows[i].params.logprobs
        vals, ids = raw[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert lp.top_ids == ids.tolist()
        assert lp.top_logprobs == pytest.approx(vals.tolist(), abs=1e-5)
    assert out.logprobs[1].rank == 1 and out.logprobs[1].top_ids == []


def test_logprobs_rank_of_unlikely_sample():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lp = sampler(logits, [row(min_tokens=1, stop_token_ids=[0, 1], ignore_eos=True,
                              temperature=0, logprobs=2)]).logprobs[0]
    # Tokens 0 and 1 blocked: greedy takes 2, the third most likely raw token.
    assert (lp.token_id, lp.rank, lp.top_ids) == (2, 3, [0, 1])


def generate(logits_rows, seeded_row_index, batch_rows, steps=15):
    """Sample `steps` times with a fixed batch; return the seeded row's tokens."""
    tokens = []
    for _ in range(steps):
        out = sampler(logits_rows, batch_rows)
        tokens.append(out.token_ids[seeded_row_index])
    return tokens


def test_seeded_rows_reproducible_and_independent_of_batch():
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(1, 2000, generator=gen)
    others = torch.randn(5, 2000, generator=gen)
    kw = dict(seed=1234, temperature=1.0, top_p=0.95)

    alone = generate(target, 0, [row(**kw)])
    assert len(set(alone)) > 3  # really random, not argmax
    assert generate(target, 0, [row(**kw)]) == alone

    torch.manual_seed(0)
    mixed = torch.cat([others[:2], target, others[2:]])
    batch = [row(temperature=0.9), row(seed=99, top_k=20), row(**kw),
             row(temperature=0, logprobs=3), row(repetition_penalty=1.2, output=[1, 2, 3]),
             row(min_p=0.2)]
    assert generate(mixed, 2, batch) == alone
    torch.manual_seed(1)  # different global RNG state must not matter either
    batch = [row(seed=5), row(top_p=0.5), row(**kw)] + [row(temperature=0.7)] * 3
    assert generate(torch.cat([others[:2], target, others[2:]]), 2, batch) == alone
    batch = [row(**kw), row(seed=1234, temperature=0.3)]  # same seed, other request
    assert generate(torch.cat([target, others[:1]]), 0, batch) == alone

    different = generate(target, 0, [row(seed=4321, temperature=1.0, top_p=0.95)])
    assert different != alone


def test_errors_are_clear():
    with pytest.raises(ValueError, match="seed=3 but no generator"):
        sampler(torch.randn(1, 10), [SamplingRow(SamplingParams(seed=3), [1], [], None, [EOS])])
    with pytest.raises(ValueError, match="num_rows=2"):
        sampler(torch.randn(3, 10), [row(), row()])


@pytest.mark.parametrize("penalty", [1e-300, 1e-45, 1e300])
def test_penalties_that_float32_cannot_hold_keep_every_row_finite(penalty):
    # 1e-300 rounds to 0 in float32 (a positive logit / 0 = inf), 1e300 to inf (a zero logit * inf = NaN):
    # either made the row's softmax NaN, and its draw a token id past the vocabulary.
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 1.0]] * 2)
    rows = [row(prompt=[0, 1, 2], repetition_penalty=penalty, seed=s) for s in range(2)]
    x = logits.clone()
    _apply_penalties(x, rows, [0, 1])
    assert torch.isfinite(x).all()
    tokens = sampler(logits, rows).token_ids
    assert all(0 <= t < 5 for t in tokens)
    if penalty < 1:
        assert tokens == [0, 0]  # the seen positive logit, divided by the smallest float32, takes the mass


def test_a_row_with_nothing_to_draw_fails_with_a_message():
    logits = torch.full((2, 6), float("-inf"))
    logits[1, 3] = 1.0
    with pytest.raises(NothingToSample, match="constraints mask every token"):
        sampler(logits, [row(seed=1), row(seed=2)])
    with pytest.raises(NothingToSample, match="not numbers"):
        sampler(torch.full((1, 6), float("nan")), [row(seed=1)])
    # Greedy: argmax over nothing but -inf would pick token 0, which the row's constraints forbid.
    with pytest.raises(NothingToSample, match="constraints mask every token"):
        sampler(torch.randn(1, 6), [row(temperature=0.0, allowed_token_ids=[2], min_tokens=1)])
    assert sampler(torch.randn(1, 6), [row(temperature=0.0, allowed_token_ids=[3], min_tokens=1)]).token_ids == [3]
