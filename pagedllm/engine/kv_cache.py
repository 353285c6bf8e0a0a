"""Block bookkeeping for the paged KV cache, in plain Python.

The tensors live in the model runner; this module only decides which physical
block holds which logical block of which request. A block is free iff its ref
count is 0. Free blocks wait in an LRU queue (oldest freed first), so that a
later prefix cache can still find recently freed blocks before they are reused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_tokens: int  # token slots that hold (or are being filled with) a token
    kv_utilization: float  # num_tokens / token slots in allocated blocks


class BlockPool:
    """Every physical block's ref count, and the queue of free ones."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        # OrderedDict as an LRU queue: O(1) pop from the front and O(1) removal
        # from the middle (which prefix-cache hits on freed blocks will need).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref count 1; the caller checks num_free_blocks first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with only {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self.ref_cnt[block_id] = 1
            ids.append(block_id)
        return ids

    def incref(self, block_id: int) -> None:
        if self.ref_cnt[block_id] == 0:
            del self._free[block_id]
        self.ref_cnt[block_id] += 1

    def decref(self, block_id: int) -> None:
        cnt = self.ref_cnt[block_id]
        assert cnt > 0, f"block {block_id} freed more often than taken"
        self.ref_cnt[block_id] = cnt - 1
        if cnt == 1:
            self._free[block_id] = None

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free


class KVCacheManager:
    """Per-request block tables over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        # Token slots reserved per request: what allocate_slots was last asked to hold.
        self._num_tokens: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's block table hold `num_tokens` tokens in all.

        All or nothing: when the pool has too few free blocks, nothing changes
        and the caller (the scheduler) decides whom to preempt.
        """
        table = self.block_tables.get(request_id)
        have = len(table) if table is not None else 0
        need = self.blocks_needed(num_tokens) - have
        if need > self.pool.num_free_blocks:
            return False
        if table is None:
            table = self.block_tables[request_id] = []
        if need > 0:
            table.extend(self.pool.allocate(need))
        self._num_tokens[request_id] = max(num_tokens, self._num_tokens.get(request_id, 0))
        return True

    def free(self, request_id: str) -> None:
        """Give back every block of the request; a no-op for unknown ids."""
        table = self.block_tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        if table is None:
            return
        # Freed last-to-first so that the tail of a sequence, the least likely
        # part to be shared by a later prefix, is reused first.
        for block_id in reversed(table):
            self.pool.decref(block_id)

    def stats(self) -> KVCacheStats:
        used = self.num_blocks - self.num_free_blocks
        tokens = sum(self._num_tokens.values())
        slots = used * self.block_size
        return KVCacheStats(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_used_blocks=used,
            num_tokens=tokens,
            kv_utilization=tokens / slots if slots else 0.0,
        )

    def check_invariants(self) -> None:
        """DESIGN.md's invariants; cheap enough for tests to call every step."""
        refs = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block_id in table:
                refs[block_id] += 1
        for block_id in range(self.num_blocks):
            assert refs[block_id] == self.pool.ref_cnt[block_id], (
                f"block {block_id}: ref count {self.pool.ref_cnt[block_id]} but {refs[block_id]} table entries"
            )
            assert (self.pool.ref_cnt[block_id] == 0) == self.pool.is_free(block_id), (
                f"block {block_id}: ref count {self.pool.ref_cnt[block_id]} but free={self.pool.is_free(block_id)}"
            )
        for request_id, table in self.block_tables.items():
            assert self._num_tokens[request_id] <= len(table) * self.block_size
