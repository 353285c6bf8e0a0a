"""Tiny random-weight models of each supported architecture: our logits equal transformers' in float32.

Each sequence goes through the paged path in pieces (a prefill chunk, the rest
of the prompt, then decodes), batched with the other sequences, so that the
comparison covers chunked prefill and decode over scattered blocks.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm.engine.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import ScheduledRequest
from pagedllm.worker.model_runner import ModelRunner

COMMON = dict(
    vocab_size=211, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)

CONFIGS = {
    # Llama 3 shape: GQA and llama3 rope scaling.
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # Llama 2 shape: MHA, default rope.
    "llama2": lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4),
    # SmolLM2 shape: 9 query heads over 3 KV heads, tied embeddings.
    "smollm2": lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=None),
    # Mistral with its sliding window, shorter than most prompts here: keys before the window drop out.
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                                         sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen2 with its first layer global and the second sliding: two KV cache groups over one pool.
    "qwen2_mixed_window": lambda: transformers.Qwen2Config(**COMMON, num_attention_heads=6, num_key_value_heads=2,
                                                           use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=16),
}


def hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random biases and norm weights too, so that a dropped one would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def paged_logits(runner: ModelRunner, prompts: list[list[int]], block_size: int, plans: list[list[int]] | None = None):
    """Logits for every position of every prompt, computed in steps: first chunk, rest of prompt, decodes
    (or, given plans, plans[i] lists how many tokens each step of sequence i adds)."""
    # One table per KV cache group, all over one pool; sliding groups give blocks back as windows move on.
    groups = runner.kv_groups
    num_blocks = len(groups) * (sum(-(-len(p) // block_size) for p in prompts) + 4)
    runner.allocate_kv_cache(num_blocks)
    kv = KVCacheManager(num_blocks, block_size, group_windows=tuple(g.window for g in groups))
    reqs = [Request(f"r{i}", p[:1], None) for i, p in enumerate(prompts)]
    for r, p in zip(reqs, prompts):
        r.all_token_ids = list(p)  # teacher forcing: every token of the prompt is known
    # A throwaway request takes some blocks first, so that block tables are not the identity.
    kv.allocate_slots("pad", 0, 3 * block_size)
    plan = plans
    if plan is None:
        plan = []
        for p in prompts:
            first = max(1, len(p) // 3)
            second = max(1, (len(p) - first) - 3) if len(p) - first > 3 else len(p) - first
            sizes = [first, second] + [1] * (len(p) - first - second)
            plan.append([s for s in sizes if s > 0])
    assert all(sum(pl) == len(p) for pl, p in zip(plan, prompts))
    got = [[] for _ in prompts]
    step = 0
    while any(step < len(pl) for pl in plan):
        scheduled = []
        for i, (r, pl) in enumerate(zip(reqs, plan)):
            if step < len(pl):
                n = pl[step]
                assert kv.allocate_slots(r.request_id, r.num_computed_tokens, n)
                scheduled.append(ScheduledRequest(r, r.num_computed_tokens, n, kv.get_block_tables(r.request_id)))
        # Force every chunk to produce logits by reading all rows: compute per-token logits via a full hidden pass.
        input_ids, positions, meta, _, _ = runner._prepare(scheduled)
        with torch.inference_mode():
            hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
            logits = runner.model.compute_logits(hidden)
        batch = [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens != 1]
        off = 0
        for s in batch:
            idx = int(s.request.request_id[1:])
            got[idx].append(logits[off : off + s.num_new_tokens])
            off += s.num_new_tokens
            s.request.num_computed_tokens += s.num_new_tokens
        step += 1
        kv.check_invariants()
    return [torch.cat(g) for g in got]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("block_size", [1, 16])
def test_logits_match_transformers(arch, block_size):
    cfg = CONFIGS[arch]()
    model = hf_model(cfg)
    gen = torch.Generator().manual_seed(1)
    lengths = [23, 7, 41, 2]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    runner = ModelRunner(cfg, model.state_dict().items(), device=torch.device("cpu"), dtype=torch.float32, block_size=block_size)
    ours = paged_logits(runner, prompts, block_size)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(o, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ["smollm2", "llama3", "qwen2", "qwen3"])
def test_fused_cpu_ops_give_the_logits_of_torch_ops(arch, dtype):
    from pagedllm.kernels.cpu import ops as cpu_ops
    from pagedllm.model.layer_kernels import fused_ops
    from pagedllm.model.layers import FusedRMSNorm

    if not cpu_ops.available(torch.empty(1, dtype=dtype)):
        pytest.skip("CPU kernels did not build")
    cfg = CONFIGS[arch]()
    weights = hf_model(cfg).state_dict()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in [23, 7, 41, 2]]
    runs = []
    for native in (True, False):
        with fused_ops(native):  # chosen at load time: the fused kernels on the CPU, unless turned off
            runner = ModelRunner(cfg, weights.items(), device=torch.device("cpu"), dtype=dtype, block_size=16)
        assert isinstance(runner.model.norm, FusedRMSNorm) == native
        runs.append(torch.cat(paged_logits(runner, prompts, 16)))
    if dtype == torch.float32:
        torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)
        return
    # The norm sums its squares in another order than torch: now and then a value moves by one bf16 step.
    torch.testing.assert_close(runs[0], runs[1], atol=0.01, rtol=0.01)
    assert (runs[0] != runs[1]).float().mean() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_torch_rms_norm_rounds_as_transformers_does(dtype):
    from pagedllm.model.layers import RMSNorm

    def hf_rms_norm(x, weight, eps):  # transformers' LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    norm = RMSNorm(72, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(72))  # a weight of ones would hide where the rounding happens
    x = torch.randn(200, 72).to(dtype)
    with torch.inference_mode():
        assert torch.equal(norm(x), hf_rms_norm(x, norm.weight, 1e-5))
        out, residual = norm(x, x)
    assert torch.equal(residual, x + x) and torch.equal(out, hf_rms_norm(x + x, norm.weight, 1e-5))


def test_missing_weight_is_a_clear_error():
    cfg = CONFIGS["llama2"]()
    sd = {k: v for k, v in hf_model(cfg).state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="missing weights.*gate_up_proj"):
        ModelRunner(cfg, sd.items(), device=torch.device("cpu"), dtype=torch.float32, block_size=16)


def test_unsupported_architecture_is_a_clear_error():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(cfg, None, device=torch.device("cpu"), dtype=torch.float32, block_size=16)
