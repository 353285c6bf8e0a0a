import numpy as np
import pytest

from pagedllm.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy
    assert not p.has_penalties and p.stop_str_hold_back == 0


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, np.int64(9)), temperature=1,
                       seed=np.int64(3))
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.stop_token_ids == [7, 9] and all(type(t) is int for t in p.stop_token_ids)
    assert type(p.temperature) is float and type(p.seed) is int
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=None), dict(max_tokens=1), dict(min_tokens=16), dict(top_p=1e-9),
    dict(top_k=1), dict(min_p=1.0), dict(presence_penalty=-2, frequency_penalty=2),
    dict(repetition_penalty=0.01), dict(logprobs=0), dict(logprobs=MAX_LOGPROBS),
    dict(logprobs=-1), dict(prompt_logprobs=-1),  # the whole vocabulary: the engine's max_logprobs decides
    dict(seed=0), dict(temperature=0), dict(max_tokens=None, min_tokens=1000),
    dict(stop_token_ids=[0]),
])
def test_good_edge_values_pass(kwargs):
    SamplingParams(**kwargs)


BAD = [
    # (parameter, value, extra kwargs, text the message must contain)
    ("n", 0, {}, ">= 1"),
    ("n", 257, {}, "<= 256"),
    ("n", 1.5, {}, "int"),
    ("temperature", -1, {}, "temperature must be >= 0, got -1"),
    ("temperature", "hot", {}, "number"),
    ("temperature", float("nan"), {}, "finite"),
    ("temperature", float("inf"), {}, "finite"),
    ("top_p", 0, {}, "(0, 1]"),
    ("top_p", 1.5, {}, "(0, 1]"),
    ("top_k", -2, {}, ">= 0"),
    ("top_k", 2.0, {}, "int"),
    ("min_p", -0.1, {}, "[0, 1]"),
    ("min_p", 1.1, {}, "[0, 1]"),
    ("seed", "42", {}, "int"),
    ("seed", 1.0, {}, "int"),
    ("max_tokens", 0, {}, ">= 1"),
    ("max_tokens", True, {}, "int"),
    ("min_tokens", -1, {}, ">= 0"),
    ("min_tokens", 17, {}, "<= max_tokens"),
    ("presence_penalty", 2.5, {}, "[-2, 2]"),
    ("presence_penalty", -2.5, {}, "[-2, 2]"),
    ("frequency_penalty", 3, {}, "[-2, 2]"),
    ("repetition_penalty", 0, {}, "> 0"),
    ("repetition_penalty", -1.0, {}, "> 0"),
    ("logprobs", -2, {}, "-1: the whole vocabulary"),
    ("prompt_logprobs", -5, {}, ">= 0"),
    ("logprobs", 2.5, {}, "int"),
    ("stop", "", {}, "non-empty"),
    ("stop", ["ok", ""], {}, "non-empty"),
    ("stop", ["ok", 3], {}, "non-empty strings"),
    ("stop", 5, {}, "string"),
    ("stop_token_ids", [-1], {}, ">= 0"),
    ("stop_token_ids", ["2"], {}, "ints"),
    ("stop_token_ids", 2, {}, "list"),
    ("ignore_eos", 1, {}, "bool"),
    ("skip_special_tokens", "yes", {}, "bool"),
    ("include_stop_str_in_output", None, {}, "bool"),
]


@pytest.mark.parametrize("name,value,extra,needle", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_raises_naming_parameter(name, value, extra, needle):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value}, **extra)
    message = str(info.value)
    assert name in message
    assert needle in message
    # The value given is quoted; for a list, the offending element is enough.
    shown = [value] + (list(value) if isinstance(value, list) else [])
    assert any(repr(v) in message or str(v) in message for v in shown)


def test_sampling_type():
    assert SamplingParams(temperature=0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(temperature=0, seed=1).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.5, seed=1).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.5).sampling_type is SamplingType.RANDOM


def test_derived_helpers():
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties
    assert SamplingParams(stop=["a", "abcd"]).stop_str_hold_back == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).stop_str_hold_back == 0
