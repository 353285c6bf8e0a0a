"""The official openai client drives the server (tiny model, float32): completions and chat,
streamed and not, stop strings, max_tokens, logprobs, token-id prompts, echo, tokenizer routes, API key."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

KEY = "test-key"
MODEL = "tiny"
PROMPT = "The quick brown fox"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))
    with BackgroundServer(build_app(engine, [MODEL, "tiny-alias"], api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=16)


def offline_text(llm: LLM, prompt, max_tokens: int, **kw) -> tuple[str, list[int]]:
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw), use_tqdm=False)[0]
    return out.outputs[0].text, out.outputs[0].token_ids


def test_models_lists_the_served_names(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny-alias"]
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_completion_equals_the_offline_greedy_text(client, offline):
    text, ids = offline_text(offline, PROMPT, 12)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 == len(ids)
    assert r.usage.prompt_tokens == len(offline.get_tokenizer().encode(PROMPT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_completion_adds_up_to_the_whole_one(client, offline):
    text, _ = offline_text(offline, PROMPT, 10)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS))
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert len(body) > 2  # really streamed, not one chunk
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10


def test_stop_string_ends_the_text_before_it(client, offline):
    text, _ = offline_text(offline, PROMPT, 16)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    expected = text[: text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body=NO_EOS)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True, extra_body=NO_EOS)
    chunks = list(chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected  # the stop string never leaks into a chunk
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_bounds_the_output(client):
    for n in (1, 5):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, extra_body=NO_EOS)
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    # Absent, completions default to 16 tokens (OpenAI's default).
    r = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 16


def test_completion_logprobs(client, offline):
    text, ids = offline_text(offline, PROMPT, 6)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    # Streamed, token ids instead of strings: exactly the offline greedy ids.
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, stream=True,
                                       extra_body={**NO_EOS, "return_tokens_as_token_ids": True})
    streamed = [int(t.split(":")[1]) for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == ids


def test_token_id_prompts(client, offline):
    tok = offline.get_tokenizer()
    prompts = ["Once upon a time", "In a galaxy far away"]
    ids = [tok.encode(p) for p in prompts]
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert single.choices[0].text == offline_text(offline, prompts[0], 8)[0]
    batch = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body=NO_EOS)
    by_text = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [c.text for c in by_text.choices] == [offline_text(offline, p, 8)[0] for p in prompts]
    assert batch.usage.prompt_tokens == sum(len(i) for i in ids) and batch.usage.completion_tokens == 16
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, stream=True, extra_body=NO_EOS)
    texts = {0: "", 1: ""}
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in batch.choices]


def test_echo_puts_the_prompt_first(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, extra_body=NO_EOS)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, extra_body=NO_EOS)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_chat_streamed_and_whole_agree_with_offline_chat(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=NO_EOS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.outputs[0].text
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_logprobs_and_max_completion_tokens(client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy: the top token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.bytes == list(t.token.encode())
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                            stream=True, extra_body=NO_EOS)
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_chat_without_max_tokens_may_run_to_the_context(client, server):
    # Absent max_tokens means "what fits": with a 500-token prompt, at most 12 tokens fit in 512.
    long_messages = [{"role": "user", "content": "word " * 480}]
    tokenized = httpx.post(server.url + "/tokenize", json={"messages": long_messages}, headers={"Authorization": f"Bearer {KEY}"}).json()
    room = tokenized["max_model_len"] - tokenized["count"]
    assert 0 < room < 40
    r = client.chat.completions.create(model=MODEL, messages=long_messages, temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize_round_trip(server, offline):
    headers = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=headers).json()
    assert t["tokens"] == offline.get_tokenizer().encode(PROMPT) and t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=headers).json()
    assert d["prompt"] == d["content"] == PROMPT


def test_tokenize_takes_llama_cpp_names(server, offline):
    """content (special tokens only with add_special), with_pieces; detokenize answers content too."""
    headers = {"Authorization": f"Bearer {KEY}"}
    tok = offline.get_tokenizer()

    def tokenize(**body):
        r = httpx.post(server.url + "/tokenize", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokenize(content=PROMPT) == tok.encode(PROMPT, add_special_tokens=False)
    assert tokenize(content=PROMPT, add_special=True) == tok.encode(PROMPT, add_special_tokens=True)
    pieces = tokenize(content=PROMPT, with_pieces=True)
    assert [p["id"] for p in pieces] == tok.encode(PROMPT, add_special_tokens=False)
    assert "".join(p["piece"] for p in pieces) == PROMPT
    r = httpx.post(server.url + "/tokenize", json={"content": "a", "prompt": "a"}, headers=headers)
    assert r.status_code == 400 and "once" in r.json()["error"]["message"]


def test_api_key_is_required_when_set(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
    assert err.value.status_code == 401 and "API key is wrong" in err.value.body["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and "no API key" in r.json()["error"]["message"]


def test_n_completions_per_prompt_are_numbered_as_openai_does(client, offline):
    prompts = ["Once upon a time", "In a galaxy far away"]
    params = SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)
    ref = offline.generate(prompts, params, use_tqdm=False)
    expected = {i * 2 + c.index: c.text for i, out in enumerate(ref) for c in out.outputs}
    kw = dict(model=MODEL, prompt=prompts, n=2, temperature=0.9, seed=7, max_tokens=6, extra_body=NO_EOS)
    r = client.completions.create(**kw)
    assert {c.index: c.text for c in r.choices} == expected and r.usage.completion_tokens == 4 * 6
    texts, finishes = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = finishes.get(c.index, 0) + 1
    assert texts == expected and finishes == {i: 1 for i in range(4)}  # one finish per choice, never repeated

    messages = [{"role": "user", "content": "Hi"}]
    chat_ref = offline.chat(messages, params, use_tqdm=False)[0]
    kw = dict(model=MODEL, messages=messages, n=2, temperature=0.9, seed=7, max_tokens=6, extra_body=NO_EOS)
    r = client.chat.completions.create(**kw)
    assert [c.message.content for c in r.choices] == [c.text for c in chat_ref.outputs]
    streamed = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {c.index: c.message.content for c in r.choices}
