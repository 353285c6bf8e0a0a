"""Which layers share block tables: KV cache groups.

Layers that attend alike (full attention, or one sliding window) keep the same
blocks, so they share one block table per request. A model that mixes kinds
(Gemma 2 and 3) gets one group per kind, each with its own tables: global
layers keep every block, sliding layers give back the blocks that every window
has left. All groups take blocks from one pool, as vLLM's hybrid allocator
does: every group holds the same number of layers (the largest kind split into
several groups), so a block id means one same-sized slice of memory whichever
group holds it, and layer i of each group stores its keys in the i-th of a
few shared tensors. Plain Python: the engine core reads it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroup:
    window: int | None  # None: full attention, every block kept
    layers: tuple[int, ...]


def kv_cache_groups(layer_windows: Sequence[int | None], max_model_len: int | None = None) -> list[KVCacheGroup]:
    """Group layers by their window; a window no shorter than max_model_len frees nothing, so it counts as full."""
    if max_model_len is not None:
        layer_windows = [w if w is not None and w < max_model_len else None for w in layer_windows]
    kinds: dict[int | None, list[int]] = {}
    for i, w in enumerate(layer_windows):
        kinds.setdefault(w, []).append(i)
    if len(kinds) <= 1:
        return [KVCacheGroup(w, tuple(layers)) for w, layers in kinds.items()]
    size = min(len(layers) for layers in kinds.values())
    return [KVCacheGroup(w, tuple(layers[j : j + size])) for w, layers in kinds.items() for j in range(0, len(layers), size)]


def slot_of_layers(groups: Sequence[KVCacheGroup]) -> dict[int, tuple[int, int]]:
    """layer -> (its group, the shared KV tensor it stores into)."""
    return {layer: (g, i) for g, group in enumerate(groups) for i, layer in enumerate(group.layers)}
