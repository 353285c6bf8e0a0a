"""What every paged-attention backend is built from: the model builds one per layer with these four numbers."""

from __future__ import annotations


class PagedAttentionBackend:
    """Subclasses add forward(q, k, v, kv_cache, meta) -> [T, num_heads * head_dim]."""

    cuda_graph_safe = False  # True where forward reads no device value on the host and skips padded rows

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
