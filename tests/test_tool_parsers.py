"""Tool call parsers: what each format reads, and the streaming contract (base.py) over every split of the text."""

from __future__ import annotations

import json
import random

import pytest

from pagedllm.entrypoints.server.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedFunctionParser,
    RequiredCallsParser,
    choose_tool_parser,
)
from pagedllm.entrypoints.server.tool_parsers.call_stream import hold_length
from pagedllm.entrypoints.server.tool_parsers.incremental_json import IncrementalJson, JsonSyntaxError

TRICKY_ARGS = {
    "code": 'if (x) { return "}"; } // </tool_call> [TOOL_CALLS]',
    "regex": "[a-z]{2,}\\d+",
    "escapes": "tab\there\nnew line \\ back / slash \u0001 \u00e9",
    "unicode": "日本語 🎉 café",
    "nested": {"list": [1, -0.5, 1e-7, True, False, None, [], {}], "deep": {"deeper": {"name": "inner"}}},
    "big": 12345678901234567890,
}


def _call(name, args):
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def _args(obj):
    return json.dumps(obj, ensure_ascii=False)


def run_stream(parser, chunks):
    """Content, calls (by index, fragments joined) and the stream's whole calls, checking each delta's shape."""
    stream = parser.stream()
    deltas = [stream.feed(c) for c in chunks] + [stream.finish()]
    content, calls = [], {}
    for delta in deltas:
        if delta is None:
            continue
        assert delta.content is None or delta.content, "an empty content delta"
        assert delta.content or delta.tool_calls, "an empty delta"
        if delta.content:
            content.append(delta.content)
        for tc in delta.tool_calls:
            if tc.index not in calls:
                assert tc.id.startswith("call_") and len(tc.id) == 29 and tc.name, tc
                calls[tc.index] = {"id": tc.id, "name": tc.name, "arguments": tc.arguments}
            else:
                assert tc.id is None and tc.name is None and tc.arguments, tc
                calls[tc.index]["arguments"] += tc.arguments
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [calls[i] for i in sorted(calls)], stream.tool_calls


def splits(text, seed=0):
    """Whole, one character at a time, and random chunkings (fixed seeds)."""
    yield [text]
    yield list(text)
    for s in range(4):
        rng = random.Random(seed * 100 + s)
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            chunks.append(text[i: i + n])
            i += n
        yield chunks


def check_contract(parser, text):
    """Every split streams the content and calls that extract() reads; returns extract()'s result."""
    whole = parser.extract(text)
    for call in whole.tool_calls:
        assert call.id.startswith("call_") and len(call.id) == 29
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)
        assert isinstance(json.loads(call.arguments), dict)
    for chunks in splits(text):
        content, streamed, complete = run_stream(parser, chunks)
        assert content == (whole.content or ""), chunks
        ids = {c.id for c in complete}
        finished = [c for c in streamed if c["id"] in ids]
        assert [(c["name"], c["arguments"]) for c in finished] == [(c.name, c.arguments) for c in whole.tool_calls]
        assert len(streamed) - len(finished) <= 1  # a call broken after it was announced (see base.py)
    return whole


def expect(parser, text, content, calls):
    whole = check_contract(parser, text)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls


# Hermes

HERMES_CASES = [
    ("The answer is 42.", "The answer is 42.", []),
    ("", "", []),
    ("a < b, <tool> and <tool_calls> are not calls", "a < b, <tool> and <tool_calls> are not calls", []),
    ('Here is JSON: {"name": "f", "arguments": {}}', 'Here is JSON: {"name": "f", "arguments": {}}', []),
    (f"<tool_call>\n{_call('get_weather', {'city': 'Paris'})}\n</tool_call>", None, [("get_weather", {"city": "Paris"})]),
    (f"Let me check.\n\n<tool_call>\n{_call('f', {})}\n</tool_call>\n", "Let me check.", [("f", {})]),
    (f"<tool_call>\n{_call('a', {'x': 1})}\n</tool_call>\n<tool_call>\n{_call('b', {'y': [2]})}\n</tool_call>",
     None, [("a", {"x": 1}), ("b", {"y": [2]})]),
    (f"<tool_call>{_call('f', TRICKY_ARGS)}</tool_call>", None, [("f", TRICKY_ARGS)]),
    (f"<tool_call>{json.dumps({'name': 'f', 'arguments': TRICKY_ARGS}, indent=2)}</tool_call>", None, [("f", TRICKY_ARGS)]),
    (f"<tool_call>{json.dumps({'name': 'f', 'arguments': TRICKY_ARGS}, separators=(',', ':'))}</tool_call>", None,
     [("f", TRICKY_ARGS)]),
    ('<tool_call>{"name": "f", "arguments": {"e": "\\ud83c\\udf89 \\u00e9\\"\\/"}}</tool_call>', None, [("f", {"e": "🎉 é\"/"})]),
    ('<tool_call>{"name": "f", "arguments": {"n": 1.50, "m": -0, "k": 1E2, "z": 0.0}}</tool_call>', None,
     [("f", {"n": 1.5, "m": 0, "k": 100.0, "z": 0.0})]),
    ('<tool_call>{"arguments": {"name": "inner"}, "name": "outer", "extra": [1]}</tool_call>', None,
     [("outer", {"name": "inner"})]),
    (f"<tool_call>{_call('f', {})}", None, [("f", {})]),  # no closing tag at the end
    (f"<tool_call>{_call('f', {})}</tool_", None, [("f", {})]),  # closing tag cut short
    (f"<tool_call>{_call('f', {})}</tool_call>\nDone, see above.", "Done, see above.", [("f", {})]),
    (f"Before <tool_call>{_call('a', {})}</tool_call> middle <tool_call>{_call('b', {})}</tool_call> after",
     "Before middle after", [("a", {}), ("b", {})]),
]

HERMES_NOT_CALLS = [
    '<tool_call>\n{"name": "f", "arguments": {"a": "cut off by max_tok',  # cut
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}',  # cut before the closing brace
    '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>',  # trailing comma
    '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',  # arguments as a string
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f"}\n</tool_call>',  # no arguments
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "a": 2}}\n</tool_call>',  # duplicate key
    '<tool_call>\n{"name": "f", "arguments": {"a": NaN}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": "raw\nnewline"}}\n</tool_call>',
    "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
    "<tool_call>",
    "<tool_call>\n",
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text, content, calls):
    expect(HermesToolParser(), text, content, calls)


@pytest.mark.parametrize("text", HERMES_NOT_CALLS)
def test_hermes_broken_calls_stay_content(text):
    expect(HermesToolParser(), text, text, [])


def test_hermes_text_after_a_broken_call_is_read_on():
    text = f"Try <tool_call>{{oops}}</tool_call> then <tool_call>{_call('f', {'a': 1})}</tool_call>"
    expect(HermesToolParser(), text, "Try <tool_call>{oops}</tool_call> then", [("f", {"a": 1})])


def test_text_is_held_back_only_while_it_could_begin_a_marker():
    stream = HermesToolParser().stream()
    assert stream.feed("Hello").content == "Hello"
    assert stream.feed(" <tool_ca") is None
    assert stream.feed("t").content == " <tool_cat"
    assert stream.feed(" and\n").content == " and"  # whitespace could precede a call
    assert stream.feed("x <").content == "\nx"
    assert stream.finish().content == " <"


def test_arguments_stream_before_the_call_ends():
    args = {"text": "a long string " * 5, "n": 1}
    text = f"<tool_call>{_call('f', args)}</tool_call>"
    stream = HermesToolParser().stream()
    cut = text.index("long string") + 20
    first = stream.feed(text[:cut])
    assert first.tool_calls[0].name == "f" and first.tool_calls[0].arguments.startswith('{"text": "a long')
    rest = [stream.feed(text[cut:]), stream.finish()]
    joined = first.tool_calls[0].arguments + "".join(tc.arguments for d in rest if d for tc in d.tool_calls)
    assert joined == _args(args)


def test_a_call_is_announced_only_when_its_arguments_begin():
    stream = HermesToolParser().stream()
    assert stream.feed('<tool_call>{"name": "f", "x": 1, ') is None
    delta = stream.feed('"arguments": {"a"')
    assert delta.tool_calls[0].name == "f" and delta.tool_calls[0].arguments == '{"a"'


def test_a_call_broken_after_it_was_announced_goes_to_content_too():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}, oops}</tool_call>'
    content, streamed, complete = run_stream(HermesToolParser(), list(text))
    assert streamed[0]["name"] == "f" and complete == []
    assert content == text == HermesToolParser().extract(text).content


def test_finish_twice_or_feed_after_finish_is_refused():
    stream = HermesToolParser().stream()
    stream.finish()
    with pytest.raises(ValueError, match="finish"):
        stream.feed("x")
    with pytest.raises(ValueError, match="already"):
        stream.finish()


# Llama 3 JSON

LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    ('\n <|python_tag|> {"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1]}}', None, [("a", {}), ("b", {"x": [1]})]),
    ('{"name": "a", "parameters": {}};', None, [("a", {})]),
    ('{"type": "function", "name": "f", "parameters": ' + _args(TRICKY_ARGS) + "}", None, [("f", TRICKY_ARGS)]),
    ('{"name": "f", "parameters": {}} and then some text', "and then some text", [("f", {})]),
    ("Hello, how can I help?", "Hello, how can I help?", []),
    ("  Hello", "  Hello", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a": ', []),  # cut
    ('{"name": "a", "parameters": {}}; {"name": "b", "param', '; {"name": "b", "param', [("a", {})]),  # second cut
    ("<|python_tag|>brave_search.call(query='x')", "<|python_tag|>brave_search.call(query='x')", []),
    ("The JSON {} is empty", "The JSON {} is empty", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json(text, content, calls):
    expect(Llama3JsonToolParser(), text, content, calls)


def test_llama3_plain_text_is_not_held_back():
    stream = Llama3JsonToolParser().stream()
    assert stream.feed(" ") is None
    assert stream.feed("<|py") is None
    assert stream.feed("x").content == " <|pyx"


# Mistral

MISTRAL_CASES = [
    ('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', None, [("a", {"x": 1}), ("b", {})]),
    ('[TOOL_CALLS] [ {"name": "f", "arguments": ' + _args(TRICKY_ARGS) + "} ]", None, [("f", TRICKY_ARGS)]),
    ('Sure. [TOOL_CALLS][{"name": "f", "arguments": {}}]', "Sure.", [("f", {})]),
    ('[TOOL_CALLS]{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}', None, [("a", {"x": 1}), ("b", {})]),
    ("[TOOL_CALLS]f[ARGS]" + _args(TRICKY_ARGS), None, [("f", TRICKY_ARGS)]),
    ('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arg', ', {"name": "b", "arg', [("a", {})]),  # cut
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("[TOOL_CALLS]", "[TOOL_CALLS]", []),
    ("[TOOL_CALLS]f[ARGS]{\"a\": ", "[TOOL_CALLS]f[ARGS]{\"a\": ", []),
    ("[TOOL_CALLS]f(x)", "[TOOL_CALLS]f(x)", []),
    ("No tools needed [TOOL] [ARGS]", "No tools needed [TOOL] [ARGS]", []),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL_CASES)
def test_mistral(text, content, calls):
    expect(MistralToolParser(), text, content, calls)


def test_only_mistral_needs_special_tokens_kept():
    assert MistralToolParser.needs_special_tokens and not HermesToolParser.needs_special_tokens


# The forced formats

NAMED_CASES = [
    ('{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    ("\n  " + json.dumps(TRICKY_ARGS, indent=1) + "\n", None, [("get_weather", TRICKY_ARGS)]),
    ("{}", None, [("get_weather", {})]),
    ('{"city": "Par', '{"city": "Par', []),  # cut by max_tokens
    ('{"city": "Paris"} trailing', "trailing", [("get_weather", {"city": "Paris"})]),
    ("not json", "not json", []),
]


@pytest.mark.parametrize("text,content,calls", NAMED_CASES)
def test_named_function(text, content, calls):
    expect(NamedFunctionParser("get_weather"), text, content, calls)


REQUIRED_CASES = [
    ('[{"name": "a", "parameters": {"x": 1}}]', None, [("a", {"x": 1})]),
    ('[{"name": "a", "parameters": ' + _args(TRICKY_ARGS) + '}, {"name": "b", "parameters": {}}]', None,
     [("a", TRICKY_ARGS), ("b", {})]),
    (json.dumps([{"name": "a", "parameters": {"q": "x"}}, {"name": "b", "parameters": {}}], indent=2), None,
     [("a", {"q": "x"}), ("b", {})]),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"q": "cut', ', {"name": "b", "parameters": {"q": "cut',
     [("a", {})]),
    ('[{"name": "a", "parameters": {"q": "cut', '[{"name": "a", "parameters": {"q": "cut', []),
    ("[]", "[]", []),
    ("[", "[", []),
]


@pytest.mark.parametrize("text,content,calls", REQUIRED_CASES)
def test_required_calls(text, content, calls):
    expect(RequiredCallsParser(), text, content, calls)


def test_named_function_needs_a_name():
    with pytest.raises(ValueError, match="name"):
        NamedFunctionParser("")


# The incremental JSON reader against json.loads / json.dumps


def _random_value(rng, depth=0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-10**20, 10**20)
    if kind == 2:
        return rng.choice([0.5, -1.25e-8, 3.0, 1e300, -0.0, 123456.789])
    if kind in (3, 4, 5):
        alphabet = 'ab "\\/\n\t\u0000\u001f{}[]:,é日🎉\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
    if kind in (6, 7):
        return {"".join(rng.choice('k"\\é🎉') for _ in range(rng.randrange(1, 4))) + str(i): _random_value(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _canonical(text):
    reader = IncrementalJson()
    for ch in text:
        reader.push(ch)
    assert reader.done
    return "".join(e[2] for e in reader.events if e[0] == "piece")


def test_incremental_json_writes_what_json_dumps_writes():
    rng = random.Random(7)
    for _ in range(300):
        value = {"v": _random_value(rng), "w": [_random_value(rng)]}
        for style in ({}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}):
            text = json.dumps(value, **style)
            assert _canonical(text) == json.dumps(json.loads(text), ensure_ascii=False)


@pytest.mark.parametrize("text", [
    '{"a": 1,}', '{"a" 1}', '{"a": 01}', '{"a": 1.}', '{"a": -}', '{"a": tru}', '{"a": nul1}', '[1 2]', '{"a": "\\x"}',
    '{"a": "\\u12g4"}', '{a: 1}', '{"a": 1}}', "{'a': 1}", '{"a": .5}', '{"a": +1}', "]",
])
def test_incremental_json_refuses_what_json_loads_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(JsonSyntaxError):
        _canonical(text)


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": -Infinity}', '{"a": 1, "a": 2}', '{"a": {"b": 1, "b": 1}}'])
def test_incremental_json_refuses_non_json_numbers_and_duplicate_keys(text):
    json.loads(text)  # which Python accepts
    with pytest.raises(JsonSyntaxError):
        _canonical(text)


def test_lone_surrogates_are_kept_as_json_loads_keeps_them():
    text = '{"a": "\\ud83d x \\udc00\\ud83d"}'
    assert _canonical(text) == json.dumps(json.loads(text), ensure_ascii=False)


def test_hold_length():
    assert hold_length("abc <tool", ("<tool_call>",)) == 6
    assert hold_length("abc\n\n", ("<tool_call>",)) == 2
    assert hold_length("abc", ("<tool_call>",)) == 0
    assert hold_length("<tool_call", ("<tool_call>",)) == 10


# Choosing a parser


@pytest.mark.parametrize("template,name,chosen", [
    ("{% if tools %}<tools>{{ tools }}</tools> reply with <tool_call>{% endif %}", None, "hermes"),
    ("<|start_header_id|>ipython<|end_header_id|>", None, "llama3_json"),
    ("{{ '<|python_tag|>' }}", None, "llama3_json"),
    ("[AVAILABLE_TOOLS] ... [TOOL_CALLS]", None, "mistral"),
    ("<|im_start|>{{ message['content'] }}", None, "hermes"),
    (None, None, "hermes"),
    ("<tool_call>", "mistral", "mistral"),
])
def test_choose_tool_parser(template, name, chosen):
    assert choose_tool_parser(template, name) == chosen
    assert chosen in TOOL_PARSERS


def test_choose_tool_parser_refuses_unknown_names():
    with pytest.raises(ValueError, match="allowed: hermes, llama3_json, mistral"):
        choose_tool_parser(None, "pythonic")


# Random outputs built from each format's pieces: the contract holds for all of them, calls or not

_PIECES = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool_", "\n", " ", "text", "<", "{", "}", '"', ",",
               _call("f", {"a": 1}), _call("g", TRICKY_ARGS)],
    "llama3_json": ["<|python_tag|>", "<|py", ";", " ", "\n", "text", "{", "}", '"',
                    '{"name": "f", "parameters": {"a": 1}}', '{"name": "g", "arguments": {}}'],
    "mistral": ["[TOOL_CALLS]", "[ARGS]", "[TOOL", "[", "]", ",", " ", "f", "text", "{", "}", '{"a": 1}',
                _call("f", {"a": 1})],
    "named": [" ", "\n", "{", "}", "text", '"', '{"a": 1}', '{"b": [1, {"c": "x"}]}'],
    "required": ["[", "]", ",", " ", "{", "}", "text", '{"name": "f", "parameters": {"a": 1}}'],
}
_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser,
            "named": lambda: NamedFunctionParser("f"), "required": RequiredCallsParser}


@pytest.mark.parametrize("fmt", sorted(_PIECES))
def test_contract_on_random_outputs(fmt):
    rng = random.Random(fmt)
    parser = _PARSERS[fmt]()
    for _ in range(150):
        check_contract(parser, "".join(rng.choice(_PIECES[fmt]) for _ in range(rng.randrange(1, 9))))
