"""Bad input, table-driven: each case gets its status and OpenAI's error shape with a message
that names the problem, and the server goes on answering."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedllm import LLMEngine
from pagedllm.config import EngineConfig
from pagedllm.entrypoints.server.app import build_app
from pagedllm.entrypoints.server.background import BackgroundServer

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "Hi"}]
LONG = list(range(100, 700))  # 600 token ids, over the tiny model's 512

C, CHAT = "/v1/completions", "/v1/chat/completions"

# (name, method, path, json body or raw bytes, headers, status, words the message must contain, param)
CASES = [
    ("malformed JSON", "POST", C, b'{"prompt": "x",', AUTH, 400, "not valid JSON", None),
    ("body not an object", "POST", C, [1, 2], AUTH, 400, "JSON object", None),
    ("prompt missing", "POST", C, {"max_tokens": 3}, AUTH, 400, "prompt is required", "prompt"),
    ("empty prompt", "POST", C, {"prompt": ""}, AUTH, 400, "prompt is empty", "prompt"),
    ("empty prompt list", "POST", C, {"prompt": []}, AUTH, 400, "empty list", "prompt"),
    ("mixed prompt list", "POST", C, {"prompt": [1, "a"]}, AUTH, 400, "prompt must be a string", "prompt"),
    ("token id out of range", "POST", C, {"prompt": [5, 10**9]}, AUTH, 400, "out of range", "prompt"),
    ("prompt longer than context", "POST", C, {"prompt": LONG}, AUTH, 400, "max_model_len", "prompt"),
    ("max_tokens cannot fit", "POST", C, {"prompt": "Hi", "max_tokens": 600}, AUTH, 400, "max_tokens=600 cannot fit", "max_tokens"),
    ("max_tokens zero", "POST", C, {"prompt": "Hi", "max_tokens": 0}, AUTH, 400, "max_tokens must be >= 1", "max_tokens"),
    ("max_tokens a string", "POST", C, {"prompt": "Hi", "max_tokens": "ten"}, AUTH, 400, "max_tokens: Input should be a valid integer", "max_tokens"),
    ("temperature a string", "POST", C, {"prompt": "Hi", "temperature": "hot"}, AUTH, 400, "temperature: Input should be a valid number", "temperature"),
    ("temperature negative", "POST", C, {"prompt": "Hi", "temperature": -1}, AUTH, 400, "temperature must be >= 0", "temperature"),
    ("top_p zero", "POST", C, {"prompt": "Hi", "top_p": 0}, AUTH, 400, "top_p must be in (0, 1]", "top_p"),
    ("top_k negative", "POST", C, {"prompt": "Hi", "top_k": -5}, AUTH, 400, "top_k", "top_k"),
    ("presence_penalty too big", "POST", C, {"prompt": "Hi", "presence_penalty": 3}, AUTH, 400, "presence_penalty must be in [-2, 2]", "presence_penalty"),
    ("repetition_penalty zero", "POST", C, {"prompt": "Hi", "repetition_penalty": 0}, AUTH, 400, "repetition_penalty must be > 0", "repetition_penalty"),
    ("n zero", "POST", C, {"prompt": "Hi", "n": 0}, AUTH, 400, "n must be >= 1", "n"),
    ("logprobs too many", "POST", C, {"prompt": "Hi", "logprobs": 50}, AUTH, 400, "logprobs must be in [0, 20]", "logprobs"),
    ("stop an int", "POST", C, {"prompt": "Hi", "stop": 5}, AUTH, 400, "stop: Input should be a valid string or a valid list", "stop"),
    ("stop empty string", "POST", C, {"prompt": "Hi", "stop": [""]}, AUTH, 400, "stop must contain only non-empty strings", "stop"),
    ("stream not a bool", "POST", C, {"prompt": "Hi", "stream": "yes"}, AUTH, 400, "stream: Input should be a valid boolean", "stream"),
    ("prompt_logprobs streamed", "POST", C, {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}, AUTH, 400,
     "not available when stream is true", "prompt_logprobs"),
    ("stream_options without stream", "POST", C, {"prompt": "Hi", "stream_options": {"include_usage": True}}, AUTH, 400,
     "stream_options is only allowed when stream is true", "stream_options"),
    ("logit_bias", "POST", C, {"prompt": "Hi", "logit_bias": {"5": 101.0}}, AUTH, 400, "must be in [-100, 100]", "logit_bias"),
    ("response_format", "POST", CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, AUTH, 400, "not supported", "response_format"),
    ("two grammars", "POST", C, {"prompt": "Hi", "guided_regex": "a", "guided_choice": ["b"]}, AUTH, 400, "give only one", "guided_choice"),
    ("bad regex", "POST", C, {"prompt": "Hi", "structured_outputs": {"regex": 5}}, AUTH, 400, "non-empty string", "structured_outputs"),
    ("suffix", "POST", C, {"prompt": "Hi", "suffix": "end"}, AUTH, 400, "suffix is not supported", "suffix"),
    ("unknown model", "POST", C, {"prompt": "Hi", "model": "gpt-9"}, AUTH, 404, "'gpt-9' does not exist", "model"),
    ("no API key", "POST", C, {"prompt": "Hi"}, {}, 401, "no API key", None),
    ("wrong API key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "API key is wrong", None),
    ("messages missing", "POST", CHAT, {"max_tokens": 2}, AUTH, 400, "messages is required", "messages"),
    ("empty messages", "POST", CHAT, {"messages": []}, AUTH, 400, "messages must be a non-empty list", "messages"),
    ("message without role", "POST", CHAT, {"messages": [{"content": "Hi"}]}, AUTH, 400, "'role' and a 'content'", "messages"),
    ("messages a string", "POST", CHAT, {"messages": "Hi"}, AUTH, 400, "messages: Input should be a valid list", "messages"),
    ("chat unknown model", "POST", CHAT, {"messages": MSG, "model": "x"}, AUTH, 404, "does not exist", "model"),
    ("chat max_completion_tokens cannot fit", "POST", CHAT, {"messages": MSG, "max_completion_tokens": 9999}, AUTH, 400,
     "max_completion_tokens=9999 cannot fit", "max_completion_tokens"),
    ("chat prompt longer than context", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}, AUTH, 400,
     "max_model_len", "messages"),
    ("top_logprobs without logprobs", "POST", CHAT, {"messages": MSG, "top_logprobs": 2}, AUTH, 400, "needs logprobs", "top_logprobs"),
    ("top_logprobs too many", "POST", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 30}, AUTH, 400,
     "top_logprobs must be in [0, 20]", "top_logprobs"),
    ("tools", "POST", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, AUTH, 400, "tools", "tools"),
    ("detokenize out of range", "POST", "/detokenize", {"tokens": [-1]}, AUTH, 400, "out of range", "tokens"),
    ("tokenize neither prompt nor messages", "POST", "/tokenize", {}, AUTH, 400, "exactly one of prompt or messages", "prompt"),
    ("seed beyond 64 bits", "POST", C, {"prompt": "x", "seed": -1180591620717411303424}, AUTH, 400, "fits in 64 bits", "seed"),
    ("chat seed beyond 64 bits", "POST", CHAT, {"messages": MSG, "seed": 1 << 64}, AUTH, 400, "fits in 64 bits", "seed"),
    # Chat input, as OpenAI's API checks it.
    ("user content null", "POST", CHAT, {"messages": [{"role": "user", "content": None}]}, AUTH, 400,
     "messages[0] has content null", "messages"),
    ("content missing", "POST", CHAT, {"messages": [{"role": "system"}]}, AUTH, 400, "messages[0] has no 'content'", "messages"),
    ("assistant content null without tool calls", "POST", CHAT,
     {"messages": [{"role": "assistant", "content": None}, *MSG]}, AUTH, 400, "only in an assistant message with tool_calls", "messages"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, AUTH, 400,
     "messages[0].role is 'wizard'; allowed roles: system, developer, user, assistant, tool", "messages"),
    ("content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, AUTH, 400,
     "messages[0].content must be a string or a list of content parts", "messages"),
    ("image part", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     AUTH, 400, "messages[0].content[0].type 'image_url' is not supported", "messages"),
    ("unknown part type", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, AUTH, 400,
     "takes parts of type 'text'", "messages"),
    ("text part without text", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, AUTH, 400,
     "messages[0].content[0].text must be a string", "messages"),
    ("part not an object", "POST", CHAT, {"messages": [{"role": "user", "content": ["Hi"]}]}, AUTH, 400,
     "messages[0].content[0] must be a content part", "messages"),
    ("refusal part from a user", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
     AUTH, 400, "a user message takes parts of type 'text'", "messages"),
    ("tool message without tool_call_id", "POST", CHAT, {"messages": [*MSG, {"role": "tool", "content": "42"}]}, AUTH, 400,
     "messages[1].tool_call_id is required", "messages"),
    ("malformed tool call", "POST", CHAT, {"messages": [*MSG, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
     AUTH, 400, "messages[1].tool_calls[0].function must be an object", "messages"),
    ("message not an object", "POST", CHAT, {"messages": ["Hi"]}, AUTH, 400, "'role' and a 'content'", "messages"),
    # Constraints that leave no token to sample, found at the first step: the request's own mistake.
    ("constraints mask every token", "POST", C, {"prompt": "Hi", "max_tokens": 3, "min_tokens": 2, "allowed_token_ids": [7],
     "stop_token_ids": [7], "temperature": 1.0}, AUTH, 400, "constraints mask every token", None),
    ("greedy, constraints mask every token", "POST", C, {"prompt": "Hi", "max_tokens": 3, "min_tokens": 2, "allowed_token_ids": [7],
     "stop_token_ids": [7], "temperature": 0.0}, AUTH, 400, "constraints mask every token", None),
    # JSON spells a lone surrogate; Python keeps it in a str that no tokenizer or UTF-8 encoder takes.
    ("lone surrogate in the prompt", "POST", C, b'{"prompt": "Hi \\ud800 there"}', AUTH, 400,
     "prompt holds a lone UTF-16 surrogate (\\ud800) at character 3", "prompt"),
    ("lone surrogate in a message", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', AUTH, 400,
     "messages[0].content holds a lone UTF-16 surrogate", "messages"),
    ("lone surrogate in a stop string", "POST", C, b'{"prompt": "Hi", "stop": ["a", "\\ud83d"]}', AUTH, 400,
     "stop[1] holds a lone UTF-16 surrogate", "stop"),
    ("unknown route", "GET", "/v2/nothing", None, AUTH, 404, "no route GET /v2/nothing", None),
    ("wrong method", "GET", C, None, AUTH, 405, "does not take GET", None),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16))
    with BackgroundServer(build_app(engine, ["tiny"], api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("name,method,path,body,headers,status,words,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_a_message_that_names_the_problem(http, name, method, path, body, headers, status, words, param):
    if isinstance(body, bytes):
        r = http.request(method, path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = http.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    assert error["param"] == param
    assert isinstance(error["type"], str) and error["type"]


def test_the_server_still_answers_after_bad_input(http, server):
    r = http.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 3, "ignore_eos": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "stream": True}, headers=AUTH)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert http.get("/health").status_code == 200  # health stays open without a key
    st = server.app.state.server.engine.stats()
    assert st.num_free_blocks == st.num_blocks  # no rejected request left anything behind


def test_a_surrogate_pair_is_valid_unicode(http):
    # An emoji as an ASCII-only JSON encoder sends it: a surrogate pair, valid.
    r = http.post(C, content=b'{"prompt": "Hi \\ud83d\\ude00", "max_tokens": 2, "ignore_eos": true}',
                  headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 1


def test_a_failing_forward_fails_only_the_request_whose_input_makes_it_fail(tiny_model_dir, monkeypatch):
    # The core in this process, so that the test can reach its model.
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=16, core_process=False))
    model = engine.core.runner.model
    real = model.forward

    def forward(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            raise RuntimeError("simulated kernel failure")
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    with BackgroundServer(build_app(engine, ["tiny"])) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"prompt": [7, POISON, 9], "max_tokens": 3, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={**body, "stream": True})
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert '"error"' in events[-2] and "simulated kernel failure" in events[-2] and events[-1] == "data: [DONE]"
        r = http.post("/v1/completions", json={**body, "prompt": [7, 8, 9]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


POISON = 4242


def test_a_crashed_engine_answers_503_and_health_says_so(tiny_model_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=32, block_size=16, core_process=False))

    def broken():
        raise AssertionError("a bookkeeping bug")

    monkeypatch.setattr(engine.core, "step", broken)
    with BackgroundServer(build_app(engine, ["tiny"])) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "a bookkeeping bug" in r.json()["error"]["message"]
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert http.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503


def test_chat_messages_openai_accepts(http):
    """What the API allows is taken: developer and tool roles, text parts, null content beside tool calls."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    for messages in (
        [{"role": "developer", "content": "Be brief."}, *MSG],
        [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "ann"}],
        [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "call_1", "content": "3"}],
        [*MSG, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, *MSG],
    ):
        r = http.post(CHAT, json={"messages": messages, "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 200, (messages, r.text)


def test_a_chat_template_that_raises_is_a_400(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "strict-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    config = model / "tokenizer_config.json"
    cfg = json.loads(config.read_text())
    cfg.pop("chat_template", None)
    config.write_text(json.dumps(cfg))
    engine = LLMEngine(EngineConfig(str(model), dtype="float32", num_kv_blocks=32, block_size=16))
    with BackgroundServer(build_app(engine, ["tiny"])) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post(CHAT, json={"messages": [{"role": "system", "content": "Be brief."}, *MSG], "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "Conversations must start with a user message" in error["message"] and error["param"] == "messages"
        assert http.post(CHAT, json={"messages": MSG, "max_tokens": 2}).status_code == 200
