"""Structured outputs: the grammar's masks are exactly right, and every constrained output follows its spec."""

from __future__ import annotations

import json
import random
import re
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from pagedllm import LLMEngine, SamplingParams, StructuredOutputsParams
from pagedllm.config import EngineConfig
from pagedllm.structured_output.backend import XgrammarBackend, choice_grammar, tuple_items_as_prefix_items
from test_isolation import prompts as _prompts
from test_isolation import run_all


def _run(engine: LLMEngine, reqs: list[tuple[str, dict, SamplingParams]]) -> dict:
    done = run_all(engine, reqs)
    engine.check_invariants()
    return done

xgr = pytest.importorskip("xgrammar")

# --- the spec ----------------------------------------------------------------


def test_exactly_one_kind_is_given():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="json, regex were given"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{'single': quotes}")
    with pytest.raises(ValueError, match="allowed keys"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_a_pydantic_model_is_a_schema_and_equal_specs_share_a_key():
    class Point(BaseModel):
        x: int
        y: int

    a = StructuredOutputsParams(json=Point)
    assert a.json == Point.model_json_schema()
    b = StructuredOutputsParams(json=json.dumps(Point.model_json_schema()))
    assert a.key == b.key
    assert StructuredOutputsParams(choice=["a", "b"]).key != StructuredOutputsParams(choice=["b", "a"]).key


def test_logits_processor_params_are_checked():
    assert SamplingParams(logit_bias={"5": 3, 7: -100}).logit_bias == {5: 3.0, 7: -100.0}
    with pytest.raises(ValueError, match=r"must be in \[-100, 100\]"):
        SamplingParams(logit_bias={5: 101})
    with pytest.raises(ValueError, match="token ids"):
        SamplingParams(logit_bias={"five": 1})
    with pytest.raises(ValueError, match="'bad1', 'bad2'"):  # every bad key in one answer
        SamplingParams(logit_bias={"bad1": 50.0, "3": 1, "bad2": 20.0})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words="word")


# --- masks against brute force on a tiny vocabulary ---------------------------

VOCAB = ["<eos>", "a", "b", "c", "ab", "bc", "ca", "abc", "cc", "ba"]
EOS = 0


def _language(pattern: str, alphabet: str = "abc", max_len: int = 7) -> set[str]:
    words, frontier = {""}, [""]
    for _ in range(max_len):
        frontier = [w + ch for w in frontier for ch in alphabet]
        words.update(frontier)
    return {w for w in words if re.fullmatch(pattern, w)}


@pytest.mark.parametrize("pattern", ["(ab|c){1,4}b?", "a{1,3}(bc)?", "c|ca|cab", "(a|b)c{0,2}a", "(ba|cc)*a"])
def test_masks_equal_brute_force_over_every_reachable_state(pattern):
    # Every string up to 9 characters: all of each bounded language, and "(ba|cc)*a" cut at that length.
    lang = _language(pattern, max_len=9)
    backend = XgrammarBackend(xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS]))
    grammar = backend.compile(StructuredOutputsParams(regex=pattern))
    rng = random.Random(0)
    for _walk in range(30):
        state, text = backend.matcher(grammar), ""
        while True:
            bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
            state.fill_bitmask(bitmask, 0)
            allowed = {t for t in range(len(VOCAB)) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}
            expected = {t for t in range(1, len(VOCAB)) if any(w.startswith(text + VOCAB[t]) for w in lang)}
            if text in lang:
                expected.add(EOS)
            if len(text) + 3 <= 9:  # beyond that the enumeration no longer holds every continuation
                assert allowed == expected, (pattern, text)
            else:
                assert expected <= allowed
            token = rng.choice(sorted(allowed))
            assert state.accept(token)
            if token == EOS:
                assert state.is_terminated and re.fullmatch(pattern, text)
                break
            text += VOCAB[token]


def test_choice_grammar_escapes_quotes_and_backslashes():
    choices = ['say "hi"', "back\\slash", "plain"]
    vocab = [*"abcdefghijklmnopqrstuvwxyz \"\\", "<eos>"]
    eos = len(vocab) - 1
    backend = XgrammarBackend(xgr.TokenizerInfo(vocab, stop_token_ids=[eos]))
    grammar = backend.compile(StructuredOutputsParams(choice=choices))
    for choice in choices:
        state = backend.matcher(grammar)
        assert all(state.accept(vocab.index(ch)) for ch in choice), choice
        assert state.accept(eos) and state.is_terminated
    assert choice_grammar(["a"]) == 'root ::= "a"'


def test_native_bitmask_apply_equals_xgrammar():
    from pagedllm.kernels.cpu import ops as cpu_ops

    if not cpu_ops.available(torch.empty(1)):
        pytest.skip("the native CPU kernels are not built here")
    gen = torch.Generator().manual_seed(0)
    for vocab in (100, 4099, 49152):
        bitmask = xgr.allocate_token_bitmask(6, vocab)
        bitmask.random_(-(2**31), 2**31 - 1, generator=gen)
        bitmask[1].zero_()
        bitmask[2, 3:] = 0
        logits = torch.randn(6, vocab, generator=gen)
        ours, theirs = logits.clone(), logits.clone()
        rows = [0, 1, 2, 5]
        cpu_ops.apply_token_bitmask(ours, bitmask, rows)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=rows, backend="cpu")
        assert torch.equal(ours, theirs)


def test_compile_errors_say_what_is_wrong():
    backend = XgrammarBackend(xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS]))
    with pytest.raises(ValueError, match=r"structured_outputs.regex could not be compiled: .*parenthesis") as info:
        backend.compile(StructuredOutputsParams(regex="(unclosed"))
    assert "/project/" not in str(info.value)
    with pytest.raises(ValueError, match="structured_outputs.grammar could not be compiled"):
        backend.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))


def test_tuple_items_of_older_drafts_compile_as_prefix_items():
    old = {"type": "array", "items": [{"type": "integer"}, {"const": "x"}], "additionalItems": False,
           "properties": {"items": {"const": {"items": [1]}}}}
    assert tuple_items_as_prefix_items(old) == {
        "type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "items": False,
        "properties": {"items": {"const": {"items": [1]}}}}  # const is data: left alone
    assert tuple_items_as_prefix_items({"items": [{"type": "integer"}]}) == {"prefixItems": [{"type": "integer"}]}
    vocab = [*'0123456789[],"x ', "<eos>"]
    backend = XgrammarBackend(xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1]))
    grammar = backend.compile(StructuredOutputsParams(json=json.dumps({"type": "array", "items": [{"type": "integer"}, {"const": "x"}],
                                                                        "additionalItems": False})))

    def accepts(text: str) -> bool:
        state = backend.matcher(grammar)
        return all(state.accept(vocab.index(ch)) for ch in text) and state.accept(len(vocab) - 1)

    assert accepts('[7,"x"]')
    assert not accepts('["x",7]') and not accepts('[7,"x",1]')


# --- through the engine (tiny random-weight model: only the grammar makes its output valid) ---


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    tags: list[Literal["a", "b"]] = Field(max_length=3)
    name: str = Field(max_length=6)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16, enable_prefix_caching=True))


def test_every_kind_of_spec_constrains_the_output(engine):
    ps = _prompts(6, seed=1)
    specs = {
        "json": (StructuredOutputsParams(json=Pet), lambda t: Pet.model_validate_json(t)),
        "regex": (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) or 1 / 0),
        "choice": (StructuredOutputsParams(choice=["left", "right", "up"]), lambda t: t in ("left", "right", "up") or 1 / 0),
        "grammar": (StructuredOutputsParams(grammar='root ::= "(" [a-c] [a-c]? [a-c]? ")"'),
                    lambda t: re.fullmatch(r"\([a-c]{1,3}\)", t) or 1 / 0),
        "lark": (StructuredOutputsParams(grammar='start: "x" NUM\nNUM: /[0-9]{2}/'), lambda t: re.fullmatch(r"x[0-9]{2}", t) or 1 / 0),
        "json_object": (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    }
    reqs = [(name, p, _greedy(200, structured_outputs=spec)) for (name, (spec, _)), p in zip(specs.items(), ps)]
    done = _run(engine, reqs)
    for name, (_, check) in specs.items():
        out = done[name].outputs[0]
        if name == "json_object" and out.finish_reason == "length":
            continue  # a random model may nest forever; the JSON is only cut, never wrong (checked below)
        assert out.finish_reason == "stop", (name, out.text)
        check(out.text)


def test_sampled_rows_n_preemption_and_prefix_hits_keep_to_the_grammar(tiny_model_dir):
    # 40 blocks of 4 tokens for 6 requests (9 sequences) of up to 100 tokens: they preempt one another.
    small = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=40, block_size=4, max_model_len=128,
                                   enable_prefix_caching=True))
    shared = _prompts(1, seed=3)[0]["prompt_token_ids"][:20]
    spec = StructuredOutputsParams(json=Pet)
    reqs = [(f"r{i}", {"prompt_token_ids": shared + [100 + i]},
             SamplingParams(temperature=1.0, seed=i, max_tokens=80, n=2 if i % 2 else 1, structured_outputs=spec))
            for i in range(6)]
    done = _run(small, reqs)
    assert small.stats().num_preemptions > 0
    assert small.stats().prefix_cache_hits > 0
    for out in done.values():
        for comp in out.outputs:
            if comp.finish_reason == "stop":
                Pet.model_validate_json(comp.text)
            else:
                assert comp.finish_reason == "length"


def test_a_grammar_that_does_not_compile_ends_its_request_alone(engine):
    ps = _prompts(3, seed=4)
    good = [(f"g{i}", p, _greedy(10, ignore_eos=True)) for i, p in enumerate(ps)]
    reference = _run(engine, [(f"ref-{rid}", p, params) for rid, p, params in good])
    bad = ("bad", ps[0], _greedy(10, structured_outputs=StructuredOutputsParams(regex="[unclosed")))
    done = _run(engine, good + [bad])
    assert done["bad"].outputs[0].finish_reason == "error"
    assert "structured_outputs.regex could not be compiled" in done["bad"].error
    for rid, _, _ in good:
        assert done[rid].outputs[0].token_ids == reference[f"ref-{rid}"].outputs[0].token_ids


def test_max_tokens_cuts_a_json_with_finish_reason_length_and_stop_strings_still_stop(engine):
    p = _prompts(2, seed=5)
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}, "minItems": 50}},
              "required": ["items"]}
    done = _run(engine, [
        ("cut", p[0], _greedy(8, structured_outputs=StructuredOutputsParams(json=schema))),
        ("stop", p[1], _greedy(50, stop=["b"], structured_outputs=StructuredOutputsParams(regex="a{3}b{3}c"))),
    ])
    assert done["cut"].outputs[0].finish_reason == "length"
    assert done["cut"].outputs[0].text.startswith("{")
    assert done["stop"].outputs[0].text == "aaa"
    assert done["stop"].outputs[0].finish_reason == "stop"


def test_an_abort_while_the_grammar_compiles_ends_the_request(engine):
    p = _prompts(1, seed=6)[0]
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 3} for i in range(40)}}
    engine.add_request("slow", p, _greedy(30, structured_outputs=StructuredOutputsParams(json=schema)))
    engine.abort_request("slow")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
    engine.check_invariants()


def test_logit_bias_allowed_token_ids_and_bad_words(engine):
    p = _prompts(4, seed=7)
    plain = _run(engine, [("plain", p[0], _greedy(6, ignore_eos=True))])["plain"].outputs[0].token_ids
    banned = plain[0]
    done = _run(engine, [
        ("bias", p[0], _greedy(6, ignore_eos=True, logit_bias={1234: 100})),
        ("allowed", p[1], _greedy(6, ignore_eos=True, allowed_token_ids=[40, 41, 42])),
        ("ban", p[0], _greedy(6, ignore_eos=True, logit_bias={banned: -100})),
    ])
    assert done["bias"].outputs[0].token_ids == [1234] * 6
    assert set(done["allowed"].outputs[0].token_ids) <= {40, 41, 42}
    assert done["ban"].outputs[0].token_ids[0] != banned


def test_bad_words_are_never_completed(engine):
    tok = engine.tokenizer
    p = _prompts(1, seed=8)[0]
    plain = _run(engine, [("plain", p, _greedy(12, ignore_eos=True))])["plain"].outputs[0]
    word = tok.decode(plain.token_ids[2:4]).strip()  # a word this prompt's greedy output writes
    done = _run(engine, [("ban", p, _greedy(12, ignore_eos=True, bad_words=[word]))])["ban"].outputs[0]
    assert word not in done.text
    out_of_vocab = SamplingParams(logit_bias={10**6: 1})
    with pytest.raises(ValueError, match="logit_bias has token id 1000000"):
        engine.add_request("oov", p, out_of_vocab)
