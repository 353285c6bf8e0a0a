"""What every paged-attention backend is built from: the model builds one per layer with these numbers."""

from __future__ import annotations


class PagedAttentionBackend:
    """Subclasses add forward(q, k, v, kv_cache, meta) -> [T, num_heads * head_dim]."""

    cuda_graph_safe = False  # True where forward reads no device value on the host and skips padded rows

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        """sliding_window: a query attends to the last sliding_window positions, itself included (None: all);
        logits_soft_cap: scores become cap * tanh(score / cap) before the softmax (Gemma 2)."""
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
