"""Tools in the prompt: passed to templates that render them, written in (Hermes style) for those that do not."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.server.tool_parsers import HermesToolParser
from pagedllm.tokenizer import apply_chat_template, load_tokenizer
from pagedllm.tool_prompt import calls_as_text, results_as_user_text

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]

# Renders tools, tool calls (arguments with tojson) and tool messages itself.
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}"
    "</{{ m.role }}>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
# Knows nothing of tools and leaves out every role but these three.
DROPPING_TEMPLATE = (
    "{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}[{{ m.role }}] {{ m.content }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
# Refuses system messages, as Gemma's does.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def _text(tokenizer, messages, **kw):
    return tokenizer.decode(apply_chat_template(tokenizer, messages, **kw))


def test_without_tools_the_prompt_is_unchanged(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _text(tokenizer, messages) == plain


def test_chatml_gets_the_tools_in_a_system_message(tokenizer):
    text = _text(tokenizer, [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools")
    assert text.count(json.dumps(WEATHER)) == 1 and "<tool_call>" in text
    assert "named SmolLM" not in text  # the template's default system message gives way to this one
    assert text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_tools_join_an_existing_system_message(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = _text(tokenizer, messages, tools=[WEATHER])
    assert text.count("<|im_start|>system") == 1
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")


def test_chatml_renders_tool_calls_as_hermes_text(tokenizer):
    text = _text(tokenizer, HISTORY, tools=[WEATHER])
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{block}<|im_end|>" in text
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in text  # ChatML shows the tool role as it is
    # what the model is shown is what the hermes parser reads back
    assert HermesToolParser().extract(block).tool_calls[0].arguments == '{"city": "Paris"}'


def test_chatml_history_with_calls_renders_without_tools_too(tokenizer):
    text = _text(tokenizer, HISTORY + [{"role": "assistant", "content": "Sunny."}])
    assert '<tool_call>\n{"name": "get_weather"' in text and "# Tools" not in text


def test_a_template_that_renders_tools_gets_them_as_given(tokenizer):
    text = _text(tokenizer, HISTORY, tools=[WEATHER], chat_template=TOOL_TEMPLATE)
    assert text.count("get_weather\", \"description\"") == 1  # once, from the template
    assert "# Tools" not in text and "<tool_call>" not in text
    assert '<call>get_weather {"city": "Paris"}</call>' in text  # arguments as an object, for tojson
    assert "<tool>sunny, 21 C</tool>" in text


def test_a_template_that_needs_tools_gets_them_as_given(tokenizer):
    """Hermes 2 Pro's tool_use template loops over tools unguarded: it fails without them, and renders them."""
    needs_tools = "{% for t in tools %}<t>{{ t.function.name }}</t>{% endfor %}" + TOOL_TEMPLATE
    text = _text(tokenizer, [{"role": "user", "content": "Hi"}], tools=[WEATHER], chat_template=needs_tools)
    assert text.startswith("<t>get_weather</t>") and "# Tools" not in text


def test_a_template_that_drops_tool_messages_gets_them_as_user_text(tokenizer):
    messages = HISTORY[:2] + [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    text = _text(tokenizer, messages, tools=[WEATHER], chat_template=DROPPING_TEMPLATE)
    assert "[user] <tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>\n" in text
    assert '[assistant] <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.startswith("[system] # Tools")


def test_a_template_without_a_system_role_gets_the_tools_in_the_first_user_message(tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = _text(tokenizer, messages, tools=[WEATHER], chat_template=NO_SYSTEM_TEMPLATE)
    assert text.startswith("<user># Tools") and text.count("<user>") == 1
    assert text.endswith("</tool_call>\n\nWeather in Paris?</user>")


def test_bad_tools_are_refused_naming_the_field(tokenizer):
    with pytest.raises(ValueError, match=r"tools\[0\].function.name"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}], tools=[{"type": "function", "function": {}}])


def test_calls_as_text_keeps_content_and_writes_every_call():
    message = {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]}
    out = calls_as_text(message)
    assert "tool_calls" not in out and out["content"].startswith("Checking.\n<tool_call>\n")
    assert out["content"].count("<tool_call>") == 2
    assert calls_as_text({"role": "user", "content": "x"}) == {"role": "user", "content": "x"}


def test_results_as_user_text_merges_only_adjacent_tool_messages():
    out = results_as_user_text([
        {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "user", "content": "u"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
    ])
    assert [m["role"] for m in out] == ["user", "user", "user"]
    assert out[0]["content"] == "<tool_response>\n1\n</tool_response>"


def test_llm_chat_passes_tools_through(tiny_model_dir):
    from pagedllm import LLM, SamplingParams

    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=32, core_process=False)
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1), use_tqdm=False, tools=[WEATHER])
    prompt = llm.engine.tokenizer.decode(out[0].prompt_token_ids)
    assert "<tools>" in prompt and "get_weather" in prompt
