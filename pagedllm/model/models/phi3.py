"""Phi-3 family decoders: Phi-3 (mini/medium, 4k and 128k), Phi-3.5-mini, Phi-4-mini.

A Llama decoder whose checkpoints keep q/k/v in one `qkv_proj` and gate/up in
one `gate_up_proj`, which load straight into our fused projections. What
differs is the rope: partial rotary (Phi-4-mini rotates 3/4 of each head) and
LongRoPE scaling on the long-context models, whose rule for choosing the
short or long factors is written at layers.LongRoPE.
"""

from __future__ import annotations

import dataclasses

from pagedllm.model.arch_config import ArchConfig
from pagedllm.model.attention.torch_backend import TorchPagedAttention
from pagedllm.model.layers import LongRoPE
from pagedllm.model.models.llama import LlamaForCausalLM

# Phi3Config's default, which transformers uses when config.json has no original_max_position_embeddings.
_ORIGINAL_MAX_POSITIONS = 4096


def phi3_rope_parameters(cfg: ArchConfig) -> dict:
    """cfg's rope parameters completed as transformers' Phi3Config completes them."""
    params = dict(cfg.rope_parameters)
    params.setdefault("partial_rotary_factor", cfg.hf.get("partial_rotary_factor", 1.0))
    if params["rope_type"] in ("su", "yarn"):  # the names older Phi-3 configs use for LongRoPE
        params["rope_type"] = "longrope"
    if params["rope_type"] not in ("default", "longrope"):
        raise ValueError(f"phi3 rope type {params['rope_type']!r} is not supported (supported: default, longrope)")
    if params["rope_type"] == "longrope":
        # Phi3Config's own attribute takes priority over the scaling dict's, as in transformers.
        params["original_max_position_embeddings"] = int(cfg.hf.get("original_max_position_embeddings")
                                                         or _ORIGINAL_MAX_POSITIONS)
    return params


class Phi3ForCausalLM(LlamaForCausalLM):
    supports_tensor_parallel = False  # not yet: tensor_parallel_size > 1 is refused for this family

    def __init__(self, cfg: ArchConfig, attn_backend: type = TorchPagedAttention) -> None:
        act = cfg.hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"phi3 with hidden_act {act!r} is not supported (supported: silu)")
        super().__init__(dataclasses.replace(cfg, rope_parameters=phi3_rope_parameters(cfg)), attn_backend)

    def forward(self, input_ids, positions, kv_caches, meta):
        if isinstance(self.rotary, LongRoPE):
            # The layers read positions only as rows of the rope table: LongRoPE's rows pick short or long factors.
            m = meta[0] if isinstance(meta, (list, tuple)) else meta
            positions = self.rotary.table_rows(positions, m.query_start_loc, m.seq_lens, m.max_seq_len)
        return super().forward(input_ids, positions, kv_caches, meta)
