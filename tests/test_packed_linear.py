"""Packing bf16 weights for oneDNN must change the speed of the projections, never their bits; widening them
to float32 (CPUs without native bf16) may change only the order of the float32 sums."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.models.llama import LlamaForCausalLM
from pagedllm.kernels.cpu.cpu_info import native_bf16, onednn_bf16
from pagedllm.kernels.cpu import packed_linear
from pagedllm.kernels.cpu.packed_linear import PackedLinear, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)), reason="torch has no oneDNN here")


@pytest.mark.parametrize("rows", [0, 1, 7, 48, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.skipif(not onednn_bf16(), reason="oneDNN has no bf16 matmul on this CPU (no AVX-512 BW/VL/DQ)")
def test_packed_linear_equals_linear_bitwise(rows, bias, monkeypatch):
    monkeypatch.setattr(packed_linear, "PAIR_ROWS", 0)  # oneDNN at every size (the pair kernel: test_skinny_gemm.py)
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=g))
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(lin.weight, lin.bias, upcast=False)(x), lin(x))


def assert_bf16_rounding_of(y: torch.Tensor, exact: torch.Tensor) -> None:
    """y is exact (a float32 result) rounded to bf16, up to one bf16 step where the order of the sums tips it."""
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    ulp = exact.abs().clamp_min(1e-30) * 2.0**-7
    assert ((y.float() - exact).abs() <= ulp).all()
    if y.numel():
        assert (y == exact.to(torch.bfloat16)).float().mean() >= 0.98


@pytest.mark.parametrize("rows", [0, 1, 7, 48, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_is_a_float32_product_rounded_to_bf16(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(160, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(160, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()
    with torch.inference_mode():
        y = PackedLinear(w, b, upcast=True)(x)
    assert_bf16_rounding_of(y, exact)
    if rows and onednn_bf16():
        assert (y == PackedLinear(w, b, upcast=False)(x)).float().mean() >= 0.98  # what the bf16 kernel gives


def test_upcast_is_the_default_only_without_native_bf16():
    assert PackedLinear(torch.zeros(4, 4, dtype=torch.bfloat16), None).upcast == (not native_bf16())


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_model_gives_the_same_logits(tied):
    cfg = ArchConfig(
        model_type="llama", vocab_size=512, hidden_size=72, intermediate_size=128, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.init_dummy_weights(0)
    hidden = torch.randn(5, 72).to(torch.bfloat16)
    with torch.inference_mode():
        before = model.compute_logits(hidden)
        projections = [m(hidden) for m in (model.layers[0].self_attn.qkv_proj, model.layers[1].mlp.gate_up_proj)]
        assert model.pack_for_cpu() == 1 + 4 * cfg.num_hidden_layers
        assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
        logits = model.compute_logits(hidden)
        after = [m(hidden) for m in (model.layers[0].self_attn.qkv_proj, model.layers[1].mlp.gate_up_proj)]
    if native_bf16():
        assert torch.equal(logits, before)
        assert all(torch.equal(a, b) for a, b in zip(after, projections))
    else:  # widened to float32: the same up to the order of the sums
        assert (logits == before).float().mean() >= 0.98
        assert all((a == b).float().mean() >= 0.98 for a, b in zip(after, projections))


@pytest.mark.parametrize("rows", [1, 7, 48, 300])
def test_packed_float32_linear_differs_from_torch_only_in_the_order_of_sums(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(160, 96, generator=g), torch.randn(160, generator=g)
    x = torch.randn(rows, 96, generator=g)
    with torch.inference_mode():
        y = PackedLinear(w, b)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_other_dtypes_are_left_alone():
    assert not can_pack(torch.empty(4, 4, dtype=torch.float16))


@pytest.fixture(scope="module")
def head32_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """tiny_model_dir's shape with heads of 32 (whole panels of the pair kernel: the rotary + KV store fuse too)."""
    import shutil

    import transformers

    path = tmp_path_factory.mktemp("head32")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = f"{tiny_model_dir}/{name}"
        if __import__("os").path.exists(src):
            shutil.copy(src, path)
    return str(path)


@pytest.mark.skipif(not native_bf16(), reason="the norms run inside the pair kernel's products with AVX-512 BF16 only")
@pytest.mark.parametrize("model", ["tiny_model_dir", "head32_model_dir"])
def test_norms_inside_the_decode_products_change_no_token_or_logprob(model, request):
    from pagedllm import LLM, SamplingParams

    llm = LLM(request.getfixturevalue(model), dtype="bfloat16", num_kv_blocks=128, block_size=16, core_process=False)
    layers = llm.engine.client.core.runner.model.layers
    assert all(layer.norms_in_products for layer in layers)
    rope_fused = layers[0].self_attn.qkv_proj.pair_weight.fuses_qkv_rope(layers[0].self_attn.head_dim)
    assert rope_fused == (model == "head32_model_dir")
    prompts = [{"prompt_token_ids": list(range(100 + i, 100 + i + 5 * (i + 1)))} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)

    def run():
        llm.engine.reset_prefix_cache()
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                for o in llm.generate(prompts, params, use_tqdm=False)]

    fused = run()
    for layer in layers:
        layer.norms_in_products = False
    assert run() == fused
