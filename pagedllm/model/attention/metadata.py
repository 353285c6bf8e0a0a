"""What attention needs to know about one flat batch, passed explicitly.

The batch is ordered with every single-token query (decode, or a one-token
chunk) first and longer queries (prefill chunks) after, so that a backend can
treat the first `num_decodes` sequences as one batched decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: physical slot of each new token = block_id * block_size + offset
    query_start_loc: torch.Tensor  # [B + 1] int32: where each sequence's queries start in the flat batch
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache for each sequence once this step's are written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 past each table's end
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    # Host copies, so backends that loop over sequences never sync with the device.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_seq_len: int
    max_query_len: int
    # Leading blocks that every decode sequence shares (same block ids): their
    # keys and values are read once for all of them (cascade attention).
    num_common_prefix_blocks: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def per_layer(meta: "AttentionMetadata | list[AttentionMetadata]", num_layers: int) -> list[AttentionMetadata]:
    """One metadata per layer: a model whose layers keep different blocks (KV cache groups) gets a list."""
    return meta if isinstance(meta, (list, tuple)) else [meta] * num_layers


def common_prefix_blocks(tables: list[list[int]], seq_lens: list[int], block_size: int) -> int:
    """How many leading blocks all the tables share, short of every sequence's last token.

    Strictly before the last token, so that each sequence keeps a suffix of its
    own (where its newest key was just written).
    """
    if len(tables) < 2:
        return 0
    limit = (min(seq_lens) - 1) // block_size
    first = tables[0]
    common = limit
    for table in tables[1:]:
        if table[:common] != first[:common]:
            common = next(i for i in range(common) if table[i] != first[i])
            if common == 0:
                return 0
    return common
