"""Paged attention on the GPU with Triton: the same interface and results as the torch backend.

One store launch and one attention launch per layer, whatever the mix of
prefills, prefill chunks and decodes; neither reads a device tensor on the
host, so decode steps can be captured in CUDA graphs. Importing this module
needs triton; `selector.get_attention_backend` is the guarded way in.
"""

from __future__ import annotations

import torch

from pagedllm.model.attention import triton_kernels
from pagedllm.model.attention.metadata import AttentionMetadata


class TritonPagedAttention:
    # Reads no device value on the host and skips padded rows (slot -1, seq_len 0):
    # decode steps can be captured in CUDA graphs and replayed.
    cuda_graph_safe = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        triton_kernels.store_kv(k, v, kv_cache, meta.slot_mapping)
        out = triton_kernels.paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale
        )
        return out.view(q.shape[0], -1)
