"""The embedded default model, SmolLM2-135M-Instruct, end to end against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who " * 3,
    "Paged attention stores keys and values in fixed-size blocks. " * 20,  # about 240 tokens: chunked prefill
    "1, 2, 3, 4,",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_greedy(default_model_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_path)

    def run(token_ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([token_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(token_ids), dtype=torch.long), pad_token_id=tok.eos_token_id)
        return out[0, len(token_ids):].tolist()

    return run


def test_greedy_matches_transformers_batched_with_chunked_prefill(hf_greedy):
    # A small token budget splits the long prompt across steps, next to other requests' decodes.
    llm = LLM(dtype="float32", max_num_batched_tokens=96, kv_cache_memory="256MiB", max_model_len=1024)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)} for t in TEXTS]
    assert len({len(p["prompt_token_ids"]) for p in prompts}) == len(prompts)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(p["prompt_token_ids"]), out.prompt
    assert "Paris" in outs[0].outputs[0].text
    st = llm.stats()
    assert st.num_free_blocks == st.num_blocks


def test_chat_uses_the_models_template():
    llm = LLM(kv_cache_memory="256MiB", max_model_len=1024)
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert tokenizer_text(llm, out.prompt_token_ids).startswith("<|im_start|>system")


def tokenizer_text(llm, ids):
    return llm.get_tokenizer().decode(ids)


def test_prompt_logprobs_equal_transformers(default_model_path):
    """Teacher-forced logprobs of real text, as lm-evaluation-harness scores it, through prefill chunks."""
    llm = LLM(dtype="float32", max_num_batched_tokens=64, kv_cache_memory="128MiB", max_model_len=1024)
    tok = llm.get_tokenizer()
    ids = tok.encode(TEXTS[3])  # about 240 tokens: four chunks
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids)
    got = torch.tensor([plp[i][ids[i]].logprob for i in range(1, len(ids))])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert [plp[i][ids[i]].rank for i in range(1, len(ids))] == [int((ref[i - 1] > want[i - 1]).sum()) + 1 for i in range(1, len(ids))]
