"""Paged attention on the CPU with a native decode kernel; the rest as the torch backend does it.

Decode dominates a serving step's attention time: the torch backend copies
every sequence's keys and values out of the pool and pads them to the longest
one before SDPA reads them again. The native kernel reads each sequence's
blocks in place, once, and stops at its own length. A prefix shared by many
sequences stays hot in the CPU's cache while they all read it, so cascade
attention brings nothing here.

Prefill chunks in bf16 (head sizes 64 and 128, AVX-512 BF16) go to a native
flash-attention kernel too, all of a step's chunks in one call so that two
threads stay busy even on one short prompt. Elsewhere they keep the torch
path, in float32: torch's CPU flash attention is about twice as fast in fp32
as in bf16 on this kind of machine, and fp32 scores are the more exact anyway.

Both kernels take the layer's sliding window and soft cap: a windowed layer
reads only the positions inside each query's window (the blocks before it may
be back in the pool), so a long context costs it only the window.
"""

from __future__ import annotations

import torch

from pagedllm.kernels.cpu import attention as cpu_kernels
from pagedllm.model.attention.metadata import AttentionMetadata
from pagedllm.model.attention.torch_backend import TorchPagedAttention


class CpuPagedAttention(TorchPagedAttention):
    def _decode_batch(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not cpu_kernels.supports(q.dtype, kv_cache.dtype, self.head_dim):
            return super()._decode_batch(q, kv_cache, meta)
        nd = meta.num_decodes
        return cpu_kernels.paged_decode(q, kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale, self.num_kv_heads,
                                        window=self.sliding_window, soft_cap=self.logits_soft_cap)

    def _prefill_batch(self, q, k, v, kv_cache, meta: AttentionMetadata, out) -> None:
        if not cpu_kernels.supports_prefill(q.dtype, self.head_dim, kv_cache.dtype):
            return super()._prefill_batch(q, k, v, kv_cache, meta, out)
        nd, ns, qsl = meta.num_decodes, meta.num_seqs, meta.query_start_loc_cpu
        rows = qsl[ns] - qsl[nd]
        starts = meta.query_start_loc[nd : ns + 1] - qsl[nd]
        cpu_kernels.paged_prefill(q[:rows], kv_cache, meta.block_tables[nd:ns], starts, meta.seq_lens[nd:ns], self.scale,
                                  out=out[:rows], num_kv_heads=self.num_kv_heads, window=self.sliding_window,
                                  soft_cap=self.logits_soft_cap)

    def _prefill(self, q, k_new, v_new, kv_cache, block_table, seq_len):
        if q.dtype != torch.bfloat16:
            return super()._prefill(q, k_new, v_new, kv_cache, block_table, seq_len)
        o = super()._prefill(q.float(), k_new.float(), v_new.float(), kv_cache, block_table, seq_len)
        return o.to(q.dtype)

    @staticmethod
    def available() -> bool:
        cpu_kernels.load_prefill()  # built now, when the backend is chosen, not inside the first step
        return cpu_kernels.load() is not None
