"""Paged attention on the GPU with Triton: the same interface and results as the torch backend.

One store launch and one attention launch per layer, whatever the mix of
prefills, prefill chunks and decodes; neither reads a device tensor on the
host, so decode steps can be captured in CUDA graphs. A layer's sliding window
and soft cap go to the attention kernel, which reads nothing before a window.
Importing this module needs triton; `selector.get_attention_backend` is the
guarded way in.
"""

from __future__ import annotations

import torch

from pagedllm.kernels.triton import attention as triton_kernels
from pagedllm.model.attention.base import PagedAttentionBackend
from pagedllm.model.attention.metadata import AttentionMetadata


class TritonPagedAttention(PagedAttentionBackend):
    # Reads no device value on the host and skips padded rows (slot -1, seq_len 0):
    # decode steps can be captured in CUDA graphs and replayed.
    cuda_graph_safe = True

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        kv_stored: bool = False,  # the caller already wrote k and v at meta.slot_mapping
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        if not kv_stored:
            triton_kernels.store_kv(k, v, kv_cache, meta.slot_mapping)
        out = triton_kernels.paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale, self.num_kv_heads,
            window=self.sliding_window, soft_cap=self.logits_soft_cap,
        )
        return out.view(q.shape[0], -1)
