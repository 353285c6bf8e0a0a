"""Chat messages are checked once, the same way for LLM.chat and the server (pagedllm/chat.py)."""

from __future__ import annotations

import pytest

from pagedllm.chat import check_messages


def test_parts_are_joined_and_null_content_kept_beside_tool_calls():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    out = check_messages([
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42", "extra": 1},
    ])
    assert out[0]["content"] == "ab" and out[1]["content"] is None and out[2] == {"role": "tool", "tool_call_id": "c1", "content": "42", "extra": 1}


@pytest.mark.parametrize("messages,words", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "function", "content": "y"}], "messages[1].role is 'function'"),
    ([{"role": "user", "content": "x", "name": 3}], "messages[0].name must be a string"),
    ([{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}], "only allowed in an assistant message"),
    ([{"role": "assistant", "content": None, "tool_calls": "c"}], "tool_calls must be a list"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "'input_audio' is not supported"),
])
def test_bad_messages_name_the_field(messages, words):
    with pytest.raises(ValueError) as err:
        check_messages(messages)
    assert words in str(err.value)


def test_llm_chat_refuses_what_the_server_refuses(tiny_model_dir):
    from pagedllm import LLM

    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=32, core_process=False)
    with pytest.raises(ValueError, match="allowed roles"):
        llm.chat([{"role": "wizard", "content": "hi"}])
    out = llm.chat([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                   use_tqdm=False)[0]
    assert out.finished
