"""OpenAI's and vLLM's extra response fields, through HTTP on the tiny model (float32): echo with logprobs
(and max_tokens=0, as lm-evaluation-harness scores prompts), prompt_logprobs, return_token_ids,
usage.prompt_tokens_details.cached_tokens, continuous_usage_stats and system_fingerprint."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from pagedllm import LLM, LLMEngine, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog"
NO_EOS = {"ignore_eos": True}
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=256, block_size=16))
    with BackgroundServer(build_app(engine, [MODEL])) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=128, block_size=16)


def post(http, path: str, **body) -> dict:
    r = http.post(path, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(http, path: str, **body) -> list[dict]:
    chunks = []
    with http.stream("POST", path, json={"model": MODEL, "temperature": 0, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def offline_prompt_logprobs(offline: LLM, prompt, k: int, max_tokens: int = 2):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=k, logprobs=k)
    return offline.generate(prompt, params, use_tqdm=False)[0]


def test_echo_with_logprobs_covers_the_prompt_then_the_output(http, offline):
    ref = offline_prompt_logprobs(offline, PROMPT, 2, max_tokens=3)
    ids = ref.prompt_token_ids
    choice = post(http, "/v1/completions", prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, **NO_EOS)["choices"][0]
    lp = choice["logprobs"]
    n = len(ids)
    assert len(lp["tokens"]) == n + 3 and choice["text"] == PROMPT + ref.outputs[0].text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before the first token
    for p in range(1, n):
        want = ref.prompt_logprobs[p]
        assert lp["token_logprobs"][p] == pytest.approx(want[ids[p]].logprob, abs=1e-4)
        assert lp["tokens"][p] == want[ids[p]].decoded_token
        assert len(lp["top_logprobs"][p]) <= 3 and lp["tokens"][p] in lp["top_logprobs"][p]  # the best 2 and the token itself
    assert "".join(lp["tokens"][:n]) == PROMPT
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][n] == len(PROMPT)  # the output's offsets go on from the end of the echoed prompt
    for a, b, tok in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]):
        assert b - a == len(tok)
    for j, tid in enumerate(ref.outputs[0].token_ids):
        assert lp["token_logprobs"][n + j] == pytest.approx(ref.outputs[0].logprobs[j][tid].logprob, abs=1e-4)

    chunks = stream(http, "/v1/completions", prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, **NO_EOS)
    streamed = {k: [] for k in ("tokens", "token_logprobs", "text_offset", "top_logprobs")}
    for c in chunks:
        for k in streamed:
            streamed[k] += c["choices"][0]["logprobs"][k]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_lm_eval_loglikelihood_requests(http, offline):
    """What lm-evaluation-harness's local-completions model sends to score a context and continuation."""
    tok = offline.get_tokenizer()
    prompts = [tok.encode(PROMPT), tok.encode("Hello there, general")]
    body = dict(prompt=prompts, max_tokens=1, logprobs=1, echo=True, seed=1234)
    r = post(http, "/v1/completions", **body)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the harness drops the last (generated) one: [ctxlen:-1]
        ref = offline_prompt_logprobs(offline, {"prompt_token_ids": ids}, 1)
        for p in range(1, len(ids)):
            assert lp["token_logprobs"][p] == pytest.approx(ref.prompt_logprobs[p][ids[p]].logprob, abs=1e-4)
            assert max(lp["top_logprobs"][p].values()) >= lp["token_logprobs"][p]  # its is_greedy test
    # max_tokens=0: the prompt alone, as vLLM answers it.
    r = post(http, "/v1/completions", **{**body, "max_tokens": 0})
    for ids, choice in zip(prompts, r["choices"]):
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) and choice["finish_reason"] == "length"
        assert choice["text"] == tok.decode(ids)
    assert r["usage"]["completion_tokens"] == 0 and r["usage"]["prompt_tokens"] == sum(map(len, prompts))
    chunks = stream(http, "/v1/completions", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == len(prompts[0])
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}).status_code == 400  # 0 needs echo


def test_prompt_logprobs_field(http, offline):
    ref = offline_prompt_logprobs(offline, PROMPT, 3)
    choice = post(http, "/v1/completions", prompt=PROMPT, max_tokens=2, prompt_logprobs=3)["choices"][0]
    got = choice["prompt_logprobs"]
    assert len(got) == len(ref.prompt_token_ids) and got[0] is None
    for entry, want in zip(got[1:], ref.prompt_logprobs[1:]):
        assert set(entry) == {str(t) for t in want}
        for t, lp in want.items():
            assert entry[str(t)]["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
            assert entry[str(t)]["rank"] == lp.rank and entry[str(t)]["decoded_token"] == lp.decoded_token
    assert choice["logprobs"] is None  # prompt_logprobs alone asks nothing of the output

    chat = post(http, "/v1/chat/completions", messages=MSG, max_tokens=2, prompt_logprobs=1)
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(1 <= len(e) <= 2 for e in chat["prompt_logprobs"][1:])

    for path, extra in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MSG})):
        r = http.post(path, json={**extra, "prompt_logprobs": 1, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    r = http.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 21})
    assert r.status_code == 400 and "prompt_logprobs must be in [0, 20]" in r.json()["error"]["message"]


def test_return_token_ids(http, offline):
    tok = offline.get_tokenizer()
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    choice = post(http, "/v1/completions", prompt=PROMPT, max_tokens=4, return_token_ids=True, **NO_EOS)["choices"][0]
    assert choice["prompt_token_ids"] == tok.encode(PROMPT) and choice["token_ids"] == ref.outputs[0].token_ids
    plain = post(http, "/v1/completions", prompt=PROMPT, max_tokens=1)["choices"][0]
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None and plain["prompt_logprobs"] is None  # vLLM's nulls

    chunks = stream(http, "/v1/completions", prompt=PROMPT, max_tokens=4, return_token_ids=True, **NO_EOS)
    assert chunks[0]["choices"][0]["prompt_token_ids"] == tok.encode(PROMPT)
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == ref.outputs[0].token_ids

    chat = post(http, "/v1/chat/completions", messages=MSG, max_tokens=3, return_token_ids=True, **NO_EOS)
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"] and len(chat["choices"][0]["token_ids"]) == 3
    assert tok.decode(chat["choices"][0]["token_ids"]) == chat["choices"][0]["message"]["content"]
    chunks = stream(http, "/v1/chat/completions", messages=MSG, max_tokens=3, return_token_ids=True, **NO_EOS)
    assert chunks[0]["prompt_token_ids"] == chat["prompt_token_ids"]
    assert sum((c["choices"][0].get("token_ids") or [] for c in chunks if c["choices"]), []) == chat["choices"][0]["token_ids"]


def test_cached_tokens_count_the_prefix_cache_hits(http):
    prompt = "a long shared system prompt " * 12  # several 16-token blocks
    first = post(http, "/v1/completions", prompt=prompt, max_tokens=2)["usage"]
    again = post(http, "/v1/completions", prompt=prompt, max_tokens=2)["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["prompt_tokens"] and cached % 16 == 0  # whole blocks; the last token is always computed
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "Hi"}]
    post(http, "/v1/chat/completions", messages=messages, max_tokens=1)
    chunks = stream(http, "/v1/chat/completions", messages=messages, max_tokens=1, stream_options={"include_usage": True})
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_continuous_usage_stats_and_system_fingerprint(http):
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, extra in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MSG})):
        chunks = stream(http, path, max_tokens=5, stream_options=options, **extra, **NO_EOS)
        body = [c for c in chunks if c["choices"]]
        counts = [c["usage"]["completion_tokens"] for c in body]
        assert counts == sorted(counts) and counts[-1] == 5
        assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"] for c in body)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        fingerprints = {c["system_fingerprint"] for c in chunks}
        whole = post(http, path, max_tokens=1, **extra)
        assert fingerprints == {whole["system_fingerprint"]} and whole["system_fingerprint"].startswith("fp_")


def test_continuous_usage_stats_without_include_usage_sends_no_usage(http):
    # vLLM's meaning: continuous_usage_stats adds usage to every chunk only where include_usage asks for usage at all.
    options = {"include_usage": False, "continuous_usage_stats": True}
    for path, extra in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MSG})):
        chunks = stream(http, path, max_tokens=3, stream_options=options, **extra, **NO_EOS)
        assert chunks and all(c.get("usage") is None for c in chunks)


def test_openai_client_reads_the_extras(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1)
        assert r.choices[0].logprobs.token_logprobs[0] is None and r.system_fingerprint.startswith("fp_")
        assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_continue_final_message_and_echo(http, offline):
    prefill = "Hello, my name is"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": prefill}]
    tok = offline.get_tokenizer()
    ids = tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=False, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    assert tok.decode(ids).endswith(prefill)  # left open: no end of turn after it
    ref = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]

    body = dict(messages=messages, max_tokens=4, continue_final_message=True, echo=True, return_token_ids=True, **NO_EOS)
    r = post(http, "/v1/chat/completions", **body)
    assert r["prompt_token_ids"] == ids
    assert r["choices"][0]["message"] == {"role": "assistant", "content": prefill + ref.outputs[0].text}
    assert post(http, "/v1/chat/completions", **body, add_generation_prompt=False)["choices"] == r["choices"]
    chunks = stream(http, "/v1/chat/completions", **body)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == prefill + ref.outputs[0].text
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"

    # Without echo the reply is the continuation alone; echo of a message of another role adds nothing.
    r = post(http, "/v1/chat/completions", **{**body, "echo": False})
    assert r["choices"][0]["message"]["content"] == ref.outputs[0].text
    r = post(http, "/v1/chat/completions", messages=MSG, max_tokens=2, echo=True)
    assert not r["choices"][0]["message"]["content"].startswith("Hi")

    r = http.post("/v1/chat/completions", json={**body, "add_generation_prompt": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    assert "cannot both be true" in r.json()["error"]["message"]


UNSUPPORTED = [
    ("/v1/completions", {"priority": 1}, "priority"),
    ("/v1/completions", {"lora_request": {"lora_name": "a"}}, "lora_request"),
    ("/v1/completions", {"truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
    ("/v1/completions", {"add_special_tokens": False}, "add_special_tokens"),
    ("/v1/completions", {"mm_processor_kwargs": {"x": 1}}, "mm_processor_kwargs"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
]


@pytest.mark.parametrize("path,extra,name", UNSUPPORTED, ids=[f"{p.split('/')[-1]}-{n}" for p, _, n in UNSUPPORTED])
def test_a_defined_field_this_server_cannot_honour_is_a_400(http, path, extra, name):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MSG}
    r = http.post(path, json={**body, "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(f"{name} is not supported by this server") and err["param"] == name
    assert err["code"] == "unsupported_parameter"


def test_harmless_values_metadata_and_unknown_fields_are_accepted(http, caplog):
    harmless = {"priority": 0, "user": "u1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto",
                "spaces_between_special_tokens": True}
    post(http, "/v1/completions", prompt=PROMPT, max_tokens=1, add_special_tokens=True, **harmless)
    post(http, "/v1/chat/completions", messages=MSG, max_tokens=1, modalities=["text"], best_of=1, **harmless)
    with caplog.at_level(logging.WARNING, logger="pagedllm.entrypoints.server.unsupported"):
        post(http, "/v1/completions", prompt=PROMPT, max_tokens=1, frobnicate=3)
    assert any("frobnicate" in r.getMessage() for r in caplog.records)


def test_chat_template_kwargs_reach_the_template(http, offline):
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    body = dict(messages=MSG, max_tokens=1, chat_template=template, chat_template_kwargs={"greeting": "Hello there. "},
                return_token_ids=True)
    r = post(http, "/v1/chat/completions", **body)
    assert offline.get_tokenizer().decode(r["prompt_token_ids"]).startswith("Hello there. ")
    bad = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"tools": []}})
    assert bad.status_code == 400 and "chat_template_kwargs may not set tools" in bad.json()["error"]["message"]


def test_routes_without_v1_answer_as_with_it(http):
    """llama.cpp's server and clients whose base URL lacks /v1 use /completions, /chat/completions, /models."""
    for path, body in (("completions", {"prompt": PROMPT, "max_tokens": 4}), ("chat/completions", {"messages": MSG, "max_tokens": 4})):
        with_v1, without = post(http, "/v1/" + path, **body), post(http, "/" + path, **body)
        key = "text" if path == "completions" else "message"
        assert without["choices"][0][key] == with_v1["choices"][0][key]
    assert http.get("/models").json()["data"][0]["id"] == MODEL
    assert all(not p.startswith(("/completions", "/chat/", "/models")) for p in http.get("/openapi.json").json()["paths"])


def test_serve_chat_template_is_a_file_or_the_template_text(tmp_path):
    from pagedllm.tokenizer import load_chat_template

    text = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    f = tmp_path / "t.jinja"
    f.write_text(text)
    assert load_chat_template(str(f)) == text
    assert load_chat_template(text) == text
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("chatml")


# --- max_logprobs: the cap on top logprobs, and -1 for the whole vocabulary -------------------------------------------
def test_the_default_cap_refuses_more_logprobs_and_the_whole_vocabulary(http):
    for body in ({"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1}):
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 1, "prompt_logprobs": -1})
    assert r.status_code == 400 and "--max-logprobs -1" in r.text, r.text


def test_max_logprobs_minus_one_gives_the_whole_vocabulary(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16, max_logprobs=-1))
    vocab = engine.model_config.vocab_size
    with BackgroundServer(build_app(engine, [MODEL])) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            chat = post(http, "/v1/chat/completions", messages=MSG, max_tokens=1, logprobs=True, top_logprobs=-1)
            assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == vocab
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=-1, prompt_logprobs=-1)
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16, max_logprobs=-1)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and all(len(p) == vocab for p in out.prompt_logprobs[1:])
    first = out.outputs[0].logprobs[0]
    assert len(first) == vocab and max(first.values(), key=lambda lp: lp.logprob).rank == 1


# --- logprob_token_ids: chosen ids' logprobs in place of the best -----------------------------------------------------
def test_logprob_token_ids_give_those_ids_logprobs(offline):
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    best = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=20),
                            use_tqdm=False)[0].outputs[0]
    chosen = [t for t in list(best.logprobs[0])[1:] if t != best.token_ids[0]][::7][:2]  # two ranked below the top
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0, logprob_token_ids=chosen)
    got = offline.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == best.token_ids
    first = got.logprobs[0]
    assert set(first) == {got.token_ids[0], *chosen}
    for t in chosen:
        assert first[t].logprob == pytest.approx(best.logprobs[0][t].logprob, abs=1e-5)
    with pytest.raises(ValueError, match="needs logprobs set"):
        SamplingParams(logprob_token_ids=[1])
    with pytest.raises(ValueError, match="1 to 128"):
        SamplingParams(logprobs=0, logprob_token_ids=list(range(129)))


def test_logprob_token_ids_over_http(http):
    body = {"prompt": "Hello", "max_tokens": 1, "logprobs": 5, "logprob_token_ids": [5000],
            "allowed_token_ids": [42], "return_tokens_as_token_ids": True}
    lp = post(http, "/v1/completions", **body)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["token_id:42"] and set(lp["top_logprobs"][0]) == {"token_id:42", "token_id:5000"}
    streamed = [c["choices"][0]["logprobs"] for c in stream(http, "/v1/completions", **body) if c["choices"]]
    assert [set(top) for s in streamed if s for top in s["top_logprobs"]] == [{"token_id:42", "token_id:5000"}]
    chat = post(http, "/v1/chat/completions", messages=MSG, max_tokens=1, logprobs=True, logprob_token_ids=[5000, 7],
                allowed_token_ids=[42], return_tokens_as_token_ids=True)
    tops = chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert {t["token"] for t in tops} == {"token_id:42", "token_id:5000", "token_id:7"}
    for bad, param in (({"logprob_token_ids": [5000]}, "logprob_token_ids"),  # no logprobs
                       ({"logprobs": 1, "logprob_token_ids": [10 ** 7]}, None),  # out of the vocabulary
                       ({"logprobs": 1, "logprob_token_ids": [5], "use_beam_search": True, "n": 2}, "logprob_token_ids")):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **bad})
        assert r.status_code == 400 and "logprob_token_ids" in r.text, r.text
        if param:
            assert r.json()["error"]["param"] == param
