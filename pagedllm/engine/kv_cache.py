"""Block bookkeeping for the paged KV cache, in plain Python.

The tensors live in the model runner; this module only decides which physical
block holds which logical block of which request, and which blocks are shared.

- A block is free iff its ref count is 0. Free blocks wait in an LRU queue
  (oldest freed first); a free block that is in the prefix cache stays
  findable until it is taken for reuse (evicted).
- Prefix caching: a full, computed block is keyed by (its parent block's id,
  the parent's allocation generation, its own tokens). The key holds the
  tokens themselves, so a hash collision can only cost a dict probe, never
  hand a request a block with other tokens; the parent's (id, generation)
  names one exact, verified block content, since a block's generation moves on
  every time it is reallocated.
- Sharing: fork gives a child every block of its parent (ref counts go up);
  a sequence that is about to write into a partly filled block that others
  share gets its own copy first (copy-on-write), recorded as a (src, dst) pair
  that the model runner copies before the step runs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockKey = tuple  # (parent block id or -1, parent generation, tokens tuple)


@dataclass
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_tokens: int  # token slots that hold (or are being filled with) a token, counted once per block
    kv_utilization: float  # num_tokens / token slots in allocated blocks
    num_cached_blocks: int  # blocks findable by prefix lookup, used or free
    peak_used_blocks: int  # most blocks in use at once since start or the last reset
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found in the cache


class BlockPool:
    """Every physical block's ref count, prefix-cache key and generation, and the queue of free ones."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.key: list[BlockKey | None] = [None] * num_blocks
        self.generation = [0] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # OrderedDict as an LRU queue: O(1) pop from the front, O(1) removal from
        # the middle (a prefix hit on a free block takes it out of the queue).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref count 1, evicting their cached content; the caller checks num_free_blocks first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with only {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            key = self.key[block_id]
            if key is not None:  # evicted: no longer findable
                del self.cached[key]
                self.key[block_id] = None
            self.generation[block_id] += 1
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

    def child_key(self, parent: int | None, tokens: tuple[int, ...]) -> BlockKey:
        if parent is None:
            return (-1, 0, tokens)
        return (parent, self.generation[parent], tokens)

    def cache(self, block_id: int, key: BlockKey) -> int:
        """Make a full, computed block findable; return the block that now stands for this content.

        When another block already holds the same prefix (two requests computed
        it in the same step), that one is returned, so the caller can share it
        and let its own copy go.
        """
        existing = self.cached.get(key)
        if existing is not None:
            return existing
        if self.key[block_id] is None:
            self.cached[key] = block_id
            self.key[block_id] = key
        return block_id


class KVCacheManager:
    """Per-request block tables over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}  # token slots each request has reserved
        self._num_cached: dict[str, int] = {}  # leading blocks of each table already offered to the prefix cache
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pairs not yet handed to the runner
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.peak_used_blocks = 0  # since start or the last reset_peak()

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

    # --- prefix cache -----------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of token_ids, in whole blocks.

        Never the whole sequence: the last token is always computed, so that
        its logits exist to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // bs):
            block = self.pool.cached.get(self.pool.child_key(parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
            parent = block
        return hits

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, so that a workload run again computes it all again (benchmarks).

        Only while no block is in use; returns whether it was done.
        """
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self.pool.cached.values():
            self.pool.key[block_id] = None
        self.pool.cached.clear()
        return True

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed_tokens: int) -> None:
        """Offer the request's newly full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(request_id)
        if table is None:
            return
        bs = self.block_size
        start = self._num_cached.get(request_id, 0)
        end = min(num_computed_tokens // bs, len(table))
        for i in range(start, end):
            parent = table[i - 1] if i else None
            block_id = table[i]
            canonical = self.pool.cache(block_id, self.pool.child_key(parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if canonical != block_id:
                # The same prefix is cached in another block: share that one and free this
                # duplicate, so equal prefixes are one set of blocks (less memory, and
                # cascade attention sees them as shared).
                self.pool.incref(canonical)
                table[i] = canonical
                self.pool.decref(block_id)
        if end > start:
            self._num_cached[request_id] = end

    # --- allocation -------------------------------------------------------
    def allocate_slots(
        self, request_id: str, num_computed_tokens: int, num_new_tokens: int, cached_blocks: list[int] = ()
    ) -> bool:
        """Make room to compute num_new_tokens after num_computed_tokens.

        cached_blocks: a prefix hit (from find_cached_prefix) that becomes the
        start of a new request's table. All or nothing: when the pool is short,
        nothing changes and the caller (the scheduler) decides whom to preempt.
        """
        table = self.block_tables.get(request_id, [])
        cow = self._shared_block_to_write(table, num_computed_tokens, num_new_tokens)
        have = len(table) + len(cached_blocks)
        num_new_blocks = max(0, self.blocks_needed(num_computed_tokens + num_new_tokens) - have)
        reviving = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)  # cached but free: taken out of the queue
        if num_new_blocks + reviving + (cow is not None) > self.pool.num_free_blocks:
            return False
        if request_id not in self.block_tables:
            self.block_tables[request_id] = table
        for block_id in cached_blocks:
            self.pool.incref(block_id)
        table.extend(cached_blocks)
        if cached_blocks:
            self._num_cached[request_id] = len(table)
        if cow is not None:
            src = table[cow]
            (dst,) = self.pool.allocate(1)
            self._copies.append((src, dst))
            self.pool.decref(src)
            table[cow] = dst
        if num_new_blocks:
            table.extend(self.pool.allocate(num_new_blocks))
        self._num_tokens[request_id] = max(num_computed_tokens + num_new_tokens, self._num_tokens.get(request_id, 0))
        self._note_peak()
        return True

    def _note_peak(self) -> None:
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_blocks - self.pool.num_free_blocks)

    def reset_peak(self) -> None:
        self.peak_used_blocks = self.num_blocks - self.pool.num_free_blocks

    def _shared_block_to_write(self, table: list[int], num_computed: int, num_new: int) -> int | None:
        """Index of a partly filled block that this write would change while others share it."""
        if num_new <= 0 or num_computed % self.block_size == 0:
            return None
        idx = num_computed // self.block_size
        if idx < len(table) and self.pool.ref_cnt[table[idx]] > 1:
            return idx
        return None

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write pairs recorded since the last call: the runner copies src to dst before the step."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent; writes into a shared partial block are copied first."""
        if child_id in self.block_tables:
            raise ValueError(f"request {child_id!r} already has blocks")
        table = list(self.block_tables.get(parent_id, []))
        for block_id in table:
            self.pool.incref(block_id)
        self.block_tables[child_id] = table
        self._num_tokens[child_id] = self._num_tokens.get(parent_id, 0)
        self._num_cached[child_id] = self._num_cached.get(parent_id, 0)
        self._note_peak()

    def free(self, request_id: str) -> None:
        """Give back every block of the request; a no-op for unknown ids."""
        table = self.block_tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table is None:
            return
        # Tail first: the end of a sequence is the part least likely to be
        # shared by a later prefix, so it is reused (evicted) first.
        for block_id in reversed(table):
            self.pool.decref(block_id)

    # --- stats and invariants ---------------------------------------------
    def stats(self) -> KVCacheStats:
        used = self.num_blocks - self.num_free_blocks
        # Each used block counted once, however many tables share it.
        filled: dict[int, int] = {}
        bs = self.block_size
        for request_id, table in self.block_tables.items():
            n = self._num_tokens.get(request_id, 0)
            for i, block_id in enumerate(table):
                filled[block_id] = max(filled.get(block_id, 0), min(bs, max(0, n - i * bs)))
        tokens = sum(filled.values())
        slots = used * bs
        return KVCacheStats(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_used_blocks=used,
            num_tokens=tokens,
            kv_utilization=tokens / slots if slots else 0.0,
            num_cached_blocks=len(self.pool.cached),
            peak_used_blocks=self.peak_used_blocks,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    def check_invariants(self) -> None:
        """DESIGN.md's invariants, plus the prefix cache's; cheap enough for tests to call every step."""
        pool = self.pool
        refs = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block_id in table:
                refs[block_id] += 1
        for block_id in range(self.num_blocks):
            assert refs[block_id] == pool.ref_cnt[block_id], (
                f"block {block_id}: ref count {pool.ref_cnt[block_id]} but {refs[block_id]} table entries"
            )
            assert (pool.ref_cnt[block_id] == 0) == pool.is_free(block_id), (
                f"block {block_id}: ref count {pool.ref_cnt[block_id]} but free={pool.is_free(block_id)}"
            )
        for key, block_id in pool.cached.items():
            assert pool.key[block_id] == key, f"cache entry for block {block_id} does not match its key"
        assert sum(k is not None for k in pool.key) == len(pool.cached)
        for request_id, table in self.block_tables.items():
            assert self._num_tokens[request_id] <= len(table) * self.block_size
