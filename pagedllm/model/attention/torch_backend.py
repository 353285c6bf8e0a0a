"""Paged attention in plain torch: the reference every other backend is tested against.

New keys and values are written into the pool at `slot_mapping`; then each
query token attends to positions 0..pos of its own sequence, read back through
the block table. Decodes are batched into one SDPA call over keys gathered
block by block; each prefill chunk is one SDPA call with a causal mask that is
offset by the tokens already in the cache (chunked prefill, recompute).

A sliding-window layer reads only the blocks its queries' windows reach (the
earlier entries of its block table may already be given back to the pool), and
masks what lies before each query's window. Soft-capped scores (Gemma 2) take
a plain matmul-softmax path, since SDPA cannot cap them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.model.attention import kv_quant
from pagedllm.model.attention.base import PagedAttentionBackend
from pagedllm.model.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ([T, kv_heads, head_dim]) into the pool at their slots (quantized, in a quantized pool)."""
    if kv_quant.is_quantized(kv_cache.dtype):
        return kv_quant.store(kv_cache, k, v, slot_mapping)
    num_kv_heads, head_dim = k.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Keys or values of sequences as contiguous [B, num_tokens, kv_heads, head_dim], via their block tables."""
    block_size = cache.shape[1]
    nblocks = -(-num_tokens // block_size)
    b = block_tables.shape[0]
    # index_select over a flat int64 index is several times faster on the CPU than
    # advanced indexing with the int32 table.
    index = block_tables[:, :nblocks].reshape(-1).to(torch.int64)
    blocks = cache.index_select(0, index)  # [B * nblocks, block_size, kvh, d]
    return blocks.view(b, nblocks * block_size, *cache.shape[2:])[:, :num_tokens]


def _partial_softmax_attention(q, k_t, v, scale, mask, soft_cap=None):
    """Attention over one part of the keys: (row max, row sum, unnormalised output), all in float32.

    q [..., n, d], k_t [..., d, L], v [..., L, d]; mask broadcasts to [..., n, L]
    (True = attend). Two parts merge exactly through their maxima and sums.
    """
    s = torch.matmul(q.float(), k_t.float()) * scale  # scores in float32: bf16 scores lose the ranking of close keys
    if soft_cap is not None:
        s = torch.tanh(s / soft_cap) * soft_cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m)
    return m, p.sum(dim=-1, keepdim=True), torch.matmul(p.to(v.dtype), v).float()


def _capped_attention(q, k, v, scale, mask, soft_cap):
    """Grouped-query attention with soft-capped scores: q [kvh, g, n, d], k and v [kvh, L, d], mask [n, L]."""
    kvh, g, n, d = q.shape
    m, l, o = _partial_softmax_attention(q.reshape(kvh, g * n, d), k.transpose(-1, -2), v, scale,
                                         mask.repeat(g, 1), soft_cap)
    return (o / l).view(kvh, g, n, d).to(q.dtype)


def attend_decodes_then_prefills(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                                 meta: AttentionMetadata, decode_batch, prefill_batch) -> torch.Tensor:
    """A step's attention in two calls: decode_batch(q, kv_cache, meta) for its decodes (the first
    meta.num_decodes sequences, one query each), prefill_batch(q, k, v, kv_cache, meta, out) for the prefill
    chunks after them (their rows of q, k, v, written into out). Returns [T, num_heads * head_dim]."""
    nd = meta.num_decodes
    if nd == meta.num_seqs == q.shape[0]:  # a decode step: its output needs no copy into a shared one
        return decode_batch(q, kv_cache, meta).reshape(nd, -1)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode_batch(q[:nd], kv_cache, meta)
    if nd < meta.num_seqs:
        first = meta.query_start_loc_cpu[nd]
        prefill_batch(q[first:], k[first:], v[first:], kv_cache, meta, out[first:])
    return out.view(q.shape[0], -1)


class TorchPagedAttention(PagedAttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 float32_prefill: bool = False) -> None:
        """float32_prefill: bf16 prefill chunks computed in float32 and rounded back (the CPU backend's choice:
        torch's CPU flash attention is about twice as fast in fp32 as in bf16 there, and more exact)."""
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window, logits_soft_cap)
        self.gqa = num_heads != num_kv_heads
        self.float32_prefill = float32_prefill

    def _gather(self, kv_cache: torch.Tensor, half: int, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Keys (half 0) or values (half 1) as [B, num_tokens, kv_heads, head_dim]; a quantized pool's in float32."""
        if kv_quant.is_quantized(kv_cache.dtype):
            return kv_quant.gather(kv_cache, half, block_tables, num_tokens, self.num_kv_heads, self.head_dim, torch.float32)
        return gather_kv(kv_cache[half], block_tables, num_tokens)

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
            write_kv(kv_cache, k, v, meta.slot_mapping)
        return attend_decodes_then_prefills(q, k, v, kv_cache, meta, self.decode_batch, self.prefill_batch)

    def prefill_batch(self, q, k, v, kv_cache, meta: AttentionMetadata, out) -> None:
        """Sequences num_decodes.. (their rows of q, k, v, from the first one's on), written into out.

        One call for all of them, so that a backend can split the work its own
        way; this one runs each chunk on its own.
        """
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        base = qsl[meta.num_decodes]
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end = qsl[i] - base, qsl[i + 1] - base
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], kv_cache, meta.block_tables[i], lens[i])

    def decode_batch(self, q, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """The first meta.num_decodes sequences, one query token each."""
        nd = meta.num_decodes
        tables, lens, max_len = meta.block_tables[:nd], meta.seq_lens[:nd], max(meta.seq_lens_cpu[:nd])
        if meta.num_common_prefix_blocks and self.sliding_window is None:
            return self._cascade_decode(q, kv_cache, tables, lens, max_len, meta.num_common_prefix_blocks)
        return self._decode(q, kv_cache, tables, lens, max_len)

    def _block_size(self, kv_cache: torch.Tensor) -> int:
        if kv_quant.is_quantized(kv_cache.dtype):
            return kv_quant.split(kv_cache, self.num_kv_heads, self.head_dim)[0].shape[2]
        return kv_cache.shape[2]

    def _first_block(self, kv_cache, first_pos: int) -> int:
        """The first block a sliding window starting at first_pos reaches (0 for full attention)."""
        if self.sliding_window is None or first_pos <= 0:
            return 0
        return first_pos // self._block_size(kv_cache)

    def _decode(self, q, kv_cache, block_tables, seq_lens, max_len):
        window = self.sliding_window
        # Blocks before every sequence's window are not read (they may be back in the pool).
        first = self._first_block(kv_cache, min(seq_lens.tolist()) - window) if window else 0
        offset = first * self._block_size(kv_cache) if first else 0
        keys = self._gather(kv_cache, 0, block_tables[:, first:], max_len - offset).transpose(1, 2)  # [D, kvh, L, d]
        values = self._gather(kv_cache, 1, block_tables[:, first:], max_len - offset).transpose(1, 2)
        out_dtype = q.dtype
        q = q.to(keys.dtype)  # a quantized pool is read back in float32
        pos = torch.arange(offset, max_len, device=q.device)[None, :]
        mask = pos < seq_lens[:, None]  # [D, L]
        if window:
            mask &= pos >= seq_lens[:, None] - window
        # The query heads that share a KV head become that head's "query rows":
        # one position, so one mask serves them all, and no K/V is repeated.
        # (SDPA's enable_gqa path is several times slower here on the CPU.)
        d = q.shape[0]
        grouped = q.view(d, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        if self.logits_soft_cap is not None:
            m, l, o = _partial_softmax_attention(grouped, keys.transpose(-1, -2), values, self.scale,
                                                 mask[:, None, None, :], self.logits_soft_cap)
            o = o / l
        else:
            o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask[:, None, None, :], scale=self.scale)
        return o.reshape(d, self.num_heads, self.head_dim).to(out_dtype)

    def _cascade_decode(self, q, kv_cache, block_tables, seq_lens, max_len, num_common):
        """Decode over a prefix that every sequence shares, plus each one's own suffix.

        The shared prefix is gathered once and met by all queries in one
        matmul, instead of being copied out of the pool once per sequence;
        the two partial softmaxes are then merged exactly through their
        maxima and sums (the log-sum-exp merge of cascade attention).
        """
        d_seqs, kvh, g, hd = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        prefix_len = num_common * self._block_size(kv_cache)
        shared = block_tables[:1, :num_common]
        kp = self._gather(kv_cache, 0, shared, prefix_len)[0].permute(1, 2, 0)  # [kvh, d, Lp]
        vp = self._gather(kv_cache, 1, shared, prefix_len)[0].transpose(0, 1)  # [kvh, Lp, d]
        qh = q.view(d_seqs, kvh, g, hd).transpose(0, 1).reshape(kvh, d_seqs * g, hd)
        m_p, l_p, o_p = _partial_softmax_attention(qh, kp, vp, self.scale, None, self.logits_soft_cap)
        # Back to [D, kvh, g, *] to meet the suffix part.
        m_p, l_p, o_p = (t.view(kvh, d_seqs, g, -1).transpose(0, 1) for t in (m_p, l_p, o_p))

        suffix_len = max_len - prefix_len
        tail = block_tables[:, num_common:]
        ks = self._gather(kv_cache, 0, tail, suffix_len).permute(0, 2, 3, 1)  # [D, kvh, d, Ls]
        vs = self._gather(kv_cache, 1, tail, suffix_len).transpose(1, 2)  # [D, kvh, Ls, d]
        mask = torch.arange(suffix_len, device=q.device)[None, :] < (seq_lens[:, None] - prefix_len)
        m_s, l_s, o_s = _partial_softmax_attention(q.view(d_seqs, kvh, g, hd), ks, vs, self.scale, mask[:, None, None, :],
                                                 self.logits_soft_cap)

        m = torch.maximum(m_p, m_s)
        a, b = torch.exp(m_p - m), torch.exp(m_s - m)
        o = (o_p * a + o_s * b) / (l_p * a + l_s * b)
        return o.to(q.dtype).reshape(d_seqs, self.num_heads, hd)

    def _prefill(self, q, k_new, v_new, kv_cache, block_table, seq_len):
        if self.float32_prefill and q.dtype == torch.bfloat16:
            return self._prefill(q.float(), k_new.float(), v_new.float(), kv_cache, block_table, seq_len).to(q.dtype)
        n = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
        plain = self.sliding_window is None and self.logits_soft_cap is None
        # A quantized pool is read back even for a prompt's first chunk: every key attention
        # sees is the stored one, as the native and Triton kernels see it.
        if seq_len == n and not kv_quant.is_quantized(kv_cache.dtype):
            # Nothing earlier in the cache: attend to the new keys directly.
            kh, vh = k_new.transpose(0, 1).unsqueeze(0), v_new.transpose(0, 1).unsqueeze(0)
            if plain:
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
                return o.squeeze(0).transpose(0, 1)
            offset = 0
        else:
            # Query i sits at position seq_len - n + i; the first one's window starts window - 1 before it.
            first = self._first_block(kv_cache, seq_len - n - self.sliding_window + 1) if self.sliding_window else 0
            offset = first * self._block_size(kv_cache) if first else 0
            kh = self._gather(kv_cache, 0, block_table[None, first:], seq_len - offset).transpose(1, 2)
            vh = self._gather(kv_cache, 1, block_table[None, first:], seq_len - offset).transpose(1, 2)
            # Computed in q's dtype (a backend may widen q beyond the cache's dtype).
            kh, vh = kh.to(q.dtype), vh.to(q.dtype)
        # Each query sees the keys from the start of its window (0 without one) to its own position.
        qpos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        kpos = torch.arange(offset, seq_len, device=q.device)[None, :]
        mask = kpos <= qpos
        if self.sliding_window is not None:
            mask &= kpos > qpos - self.sliding_window
        if self.logits_soft_cap is not None:
            g = self.num_heads // self.num_kv_heads
            o = _capped_attention(qh[0].view(self.num_kv_heads, g, n, self.head_dim), kh[0], vh[0], self.scale, mask,
                                  self.logits_soft_cap)
            return o.view(self.num_heads, n, self.head_dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=self.gqa)
        return o.squeeze(0).transpose(0, 1)
