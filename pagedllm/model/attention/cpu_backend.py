"""Paged attention on the CPU with native decode and prefill kernels; the rest delegated to a torch backend.

Decode dominates a serving step's attention time: the torch backend copies
every sequence's keys and values out of the pool and pads them to the longest
one before SDPA reads them again. The native kernel reads each sequence's
blocks in place, once, and stops at its own length. A prefix shared by many
sequences stays hot in the CPU's cache while they all read it, so cascade
attention brings nothing here.

Prefill chunks in bf16 (head sizes 64 and 128, AVX-512 BF16) go to a native
flash-attention kernel too, all of a step's chunks in one call so that two
threads stay busy even on one short prompt. Elsewhere they go to the torch
backend this one holds (as does what the decode kernel does not take), in
float32: torch's CPU flash attention is about twice as fast in fp32 as in
bf16 on this kind of machine, and fp32 scores are the more exact anyway.

Both kernels take the layer's sliding window and soft cap: a windowed layer
reads only the positions inside each query's window (the blocks before it may
be back in the pool), so a long context costs it only the window.
"""

from __future__ import annotations

import torch

from pagedllm.kernels.cpu import attention as cpu_kernels
from pagedllm.model.attention.base import PagedAttentionBackend
from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.torch_backend import TorchPagedAttention, attend_decodes_then_prefills, write_kv


class CpuPagedAttention(PagedAttentionBackend):
    """The native kernels where they take the step's dtypes and head size; the torch backend it holds for the rest."""

    fallback = TorchPagedAttention  # the class of that torch backend

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window, logits_soft_cap)
        self.torch = self.fallback(num_heads, num_kv_heads, head_dim, scale, sliding_window, logits_soft_cap,
                                         float32_prefill=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                kv_stored: bool = False) -> torch.Tensor:
        """As TorchPagedAttention.forward."""
        if not kv_stored:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        return attend_decodes_then_prefills(q, k, v, kv_cache, meta, self.decode_batch, self.prefill_batch)

    def decode_batch(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not cpu_kernels.supports(q.dtype, kv_cache.dtype, self.head_dim):
            return self.torch.decode_batch(q, kv_cache, meta)
        nd = meta.num_decodes
        return cpu_kernels.paged_decode(q, kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale, self.num_kv_heads,
                                        window=self.sliding_window, soft_cap=self.logits_soft_cap)

    def prefill_batch(self, q, k, v, kv_cache, meta: AttentionMetadata, out) -> None:
        if not cpu_kernels.supports_prefill(q.dtype, self.head_dim, kv_cache.dtype):
            return self.torch.prefill_batch(q, k, v, kv_cache, meta, out)
        nd, ns, qsl = meta.num_decodes, meta.num_seqs, meta.query_start_loc_cpu
        rows = qsl[ns] - qsl[nd]
        starts = meta.query_start_loc[nd : ns + 1] - qsl[nd]
        cpu_kernels.paged_prefill(q[:rows], kv_cache, meta.block_tables[nd:ns], starts, meta.seq_lens[nd:ns], self.scale,
                                  out=out[:rows], num_kv_heads=self.num_kv_heads, window=self.sliding_window,
                                  soft_cap=self.logits_soft_cap)

    @staticmethod
    def available() -> bool:
        cpu_kernels.load_prefill()  # built now, when the backend is chosen, not inside the first step
        return cpu_kernels.load() is not None
