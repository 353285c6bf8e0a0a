"""Packing bf16 weights for oneDNN must change the speed of the projections, never their bits."""

from __future__ import annotations

import pytest
import torch

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.models.llama import LlamaForCausalLM
from pagedllm.model.packed_linear import PackedLinear, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)), reason="torch has no oneDNN here")


@pytest.mark.parametrize("rows", [0, 1, 7, 48, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_bitwise(rows, bias):
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=g))
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(lin.weight, lin.bias)(x), lin(x))


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
        assert torch.equal(model.compute_logits(hidden), before)
        after = [m(hidden) for m in (model.layers[0].self_attn.qkv_proj, model.layers[1].mlp.gate_up_proj)]
    assert all(torch.equal(a, b) for a, b in zip(after, projections))


def test_float32_weights_are_left_alone():
    assert not can_pack(torch.empty(4, 4))
