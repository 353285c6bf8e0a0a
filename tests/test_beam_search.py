"""Beam search over shared blocks: the same best sequences as transformers, and blocks shared between beams."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, BeamSearchParams

PROMPTS = ["The capital of France is", "def add(a, b):", "My favourite food is"]


@pytest.fixture(scope="module")
def smollm2_fp32():
    return LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(default_model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


def hf_beams(model, token_ids: list[int], width: int, max_tokens: int, **kw) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                             num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=max_tokens, **kw)
    eos = model.generation_config.eos_token_id
    seqs = []
    for row in out[:, len(token_ids):].tolist():
        # transformers pads finished beams (here with the EOS id itself): cut after the first EOS.
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    return seqs


@pytest.mark.parametrize("width,max_tokens,length_penalty", [(4, 20, 1.0), (3, 12, 0.5)])
def test_best_sequences_match_transformers(smollm2_fp32, hf_model, width, max_tokens, length_penalty):
    tok = smollm2_fp32.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in PROMPTS]
    outs = smollm2_fp32.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty))
    for prompt, out in zip(prompts, outs):
        want = hf_beams(hf_model, prompt["prompt_token_ids"], width, max_tokens, length_penalty=length_penalty)
        got = [s.output_token_ids for s in out.sequences]
        assert got[0] == want[0], f"best beam differs for {tok.decode(prompt['prompt_token_ids'])!r}"
        assert got == want
        assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences), reverse=True)
    st = smollm2_fp32.stats()
    assert st.num_free_blocks == st.num_blocks
    smollm2_fp32.engine.check_invariants()


def test_beams_share_blocks(tiny_model_dir):
    """Width-4 beams over a 200-token prompt: the prompt's blocks are held once, not four times."""
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=512, block_size=16)
    prompt = {"prompt_token_ids": list(range(1000, 1200))}
    llm.engine.reset_peak_stats()
    out = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=24, ignore_eos=True))[0]
    assert len(out.sequences) == 4 and all(len(s.output_token_ids) == 24 for s in out.sequences)
    peak = llm.stats().peak_used_blocks
    private = 4 * -(-(200 + 24) // 16)  # every beam with its own copy of everything
    assert peak < private * 0.5, (peak, private)
    st = llm.stats()
    assert st.num_free_blocks == st.num_blocks
    llm.engine.check_invariants()


def test_bad_beam_search_params():
    for kwargs, match in [
        (dict(beam_width=0, max_tokens=5), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, max_tokens=5, temperature=0.7), "temperature"),
        (dict(beam_width=2, max_tokens=5, early_stopping="sometimes"), "early_stopping"),
    ]:
        with pytest.raises(ValueError, match=match):
            BeamSearchParams(**kwargs)
