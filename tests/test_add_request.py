"""One way into LLMEngine: add_request takes a prompt with its params, or a request made by make_request."""

from __future__ import annotations

import pytest

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import LLMEngine
from pagedllm.sampling_params import SamplingParams


def test_add_request_takes_a_prompt_or_a_made_request(tiny_model_dir):
    engine = LLMEngine(EngineConfig(tiny_model_dir, dtype="float32", num_kv_blocks=64, core_process=False))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(300, 320))}
    assert engine.add_request("a", prompt, params) == "a"
    made = engine.make_request(prompt, params, "b")
    with pytest.raises(ValueError, match="differs"):
        engine.add_request("c", made)
    assert engine.add_request(None, made, final_only=True) == "b"
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert len(outs["b"]) == 1 and outs["b"][0].finished  # final_only: one output, at the end
    assert outs["a"][-1].outputs[0].token_ids == outs["b"][0].outputs[0].token_ids
    engine.check_invariants()
