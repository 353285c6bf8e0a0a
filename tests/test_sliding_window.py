"""Sliding-window layers through the whole engine: outputs equal transformers', and blocks go back to the pool.

Mistral with every layer sliding has one KV cache group whose blocks are
freed as the window moves on; Qwen2 with a global first layer and sliding
later ones has two groups over one pool (the global one keeps everything).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.engine.kv_cache import NULL_BLOCK, KVCacheManager

WINDOW = 8
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=WINDOW),
    "qwen2_mixed": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=1),
}


def _model_dir(tmp_path, cfg):
    from pagedllm.model.synthetic import word_level_tokenizer

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)  # sharper logits: fewer near-ties in greedy decoding
    model.save_pretrained(tmp_path)
    word_level_tokenizer(cfg.vocab_size).save_pretrained(tmp_path)
    return str(tmp_path), model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_outputs_equal_transformers_over_several_windows(tmp_path, arch):
    path, model = _model_dir(tmp_path, CONFIGS[arch]())
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 13, 21)]
    new = 3 * WINDOW + 4
    # Block size 2 and a chunked prompt: blocks leave the window in the middle of prefills and decodes.
    llm = LLM(model=path, dtype="float32", block_size=2, max_num_batched_tokens=16, max_model_len=128,
              attention_backend="torch", core_process=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, min_new_tokens=new)[0, len(p):]
        assert out.outputs[0].token_ids == ref.tolist()


def test_a_sliding_group_holds_about_a_window_of_blocks(tmp_path):
    path, _ = _model_dir(tmp_path, CONFIGS["mistral"]())
    llm = LLM(model=path, dtype="float32", block_size=2, max_model_len=256, enable_prefix_caching=False,
              core_process=False)
    llm.generate([{"prompt_token_ids": [5] * 10}], SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))
    # 90 tokens would take 45 blocks with full attention; the window keeps 8 tokens, +1 block being filled.
    assert llm.stats().peak_used_blocks <= WINDOW // 2 + 2 + 10 // 2


def test_blocks_that_leave_every_window_go_back_and_leave_placeholders():
    kv = KVCacheManager(num_blocks=32, block_size=4, group_windows=(None, 6))
    assert kv.allocate_slots("a", 0, 12)  # 3 blocks in each group
    assert kv.num_free_blocks == 32 - 6
    # From position 12 on, a query sees 7..12: block 0 (0..3) is left behind in the sliding group only.
    assert kv.allocate_slots("a", 12, 1)
    full, sliding = kv.get_block_tables("a")
    assert len(full) == len(sliding) == 4 and sliding[0] == NULL_BLOCK and NULL_BLOCK not in full[1:]
    assert kv.num_free_blocks == 32 - 8 + 1
    kv.check_invariants()
    kv.fork("a", "b")  # the child shares the live blocks only
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 32
    kv.check_invariants()


def test_a_prefix_hit_is_a_hit_in_every_group_and_takes_only_the_window():
    kv = KVCacheManager(num_blocks=64, block_size=4, group_windows=(None, 6))
    tokens = list(range(30))
    assert kv.allocate_slots("a", 0, 30)
    kv.cache_full_blocks("a", tokens, 30)
    hit = kv.find_cached_prefix(tokens + [99])
    assert hit.num_tokens == 28  # 7 whole blocks, in both groups
    full, sliding = hit.blocks
    assert full == kv.get_block_tables("a")[0][:7]
    # The first query after the hit sits at 28 and sees 23..28: blocks 5 and 6 of the sliding group.
    assert sliding[:5] == [NULL_BLOCK] * 5 and sliding[5:] == kv.get_block_tables("a")[1][5:7]
    assert kv.allocate_slots("b", 28, 3, hit)
    kv.check_invariants()
    kv.free("a")
    kv.free("b")
    kv.check_invariants()
    # A group that lost its copy of the prefix limits the hit for all.
    kv2 = KVCacheManager(num_blocks=64, block_size=4, group_windows=(None, None))
    assert kv2.allocate_slots("a", 0, 12)
    kv2.cache_full_blocks("a", tokens, 12)
    kv2.pool.cached.pop(kv2.pool.key[kv2.get_block_tables("a")[1][1]])
    kv2.pool.key[kv2.get_block_tables("a")[1][1]] = None
    assert kv2.find_cached_prefix(tokens).num_tokens == 4
