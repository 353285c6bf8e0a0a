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
- KV cache groups (worker/kv_cache_groups.py): a model whose layers attend
  differently has one block table per group for each request, all over one
  pool. In a sliding-window group, the blocks that every later query's window
  has left go back to the pool as the sequence moves on; their table entries
  become placeholders (NULL_BLOCK) that no attention backend reads. A prefix
  hit must be a hit in every group; a sliding group takes only the blocks that
  the first window after the hit reaches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BlockKey = tuple  # (parent block id, parent generation, tokens tuple); (-1, group, tokens) for a first block

# A table entry whose block has left every window and gone back to the pool. Block 0 is
# a real block: gathered by a backend it reads finite numbers that the window masks out.
NULL_BLOCK = 0


@dataclass
class PrefixHit:
    """A new request's longest cached prefix, in whole blocks, as the start of each group's block table."""

    num_tokens: int = 0
    blocks: list = field(default_factory=list)  # per group: block ids, NULL_BLOCK before a sliding window
    first_live: list = field(default_factory=list)  # per group: entries before this index are placeholders


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

    def child_key(self, parent: int | None, tokens: tuple[int, ...], group: int = 0) -> BlockKey:
        if parent is None:
            return (-1, group, tokens)
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
    """Per-request block tables, one per KV cache group, over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 group_windows: tuple = (None,)) -> None:
        """group_windows: each KV cache group's sliding window, None for full attention."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not group_windows:
            raise ValueError("a KV cache needs at least one group")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.windows = list(group_windows)
        groups = range(len(self.windows))
        self.tables: list[dict[str, list[int]]] = [{} for _ in groups]
        self._first_live: list[dict[str, int]] = [{} for _ in groups]  # leading placeholders, sliding groups only
        self._num_cached: list[dict[str, int]] = [{} for _ in groups]  # leading blocks offered to the prefix cache
        self._num_tokens: dict[str, int] = {}  # token slots each request has reserved
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pairs not yet handed to the runner
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.peak_used_blocks = 0  # since start or the last reset_peak()

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def block_tables(self) -> dict[str, list[int]]:
        """The first group's tables (the only ones, for a model whose layers all attend alike)."""
        return self.tables[0]

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks(self, num_tokens: int, chunk: int = 1) -> int:
        """The most blocks one sequence of num_tokens holds in all groups at once, computing chunk tokens a step."""
        total = 0
        for w in self.windows:
            n = self.blocks_needed(num_tokens)
            total += n if w is None else min(n, self.blocks_needed(w - 1 + chunk) + 1)
        return total

    def get_block_table(self, request_id: str) -> list[int]:
        return self.tables[0].get(request_id, [])

    def get_block_tables(self, request_id: str) -> list[list[int]]:
        """The live tables of every group; the runner reads them before anything changes them."""
        return [t.get(request_id, []) for t in self.tables]

    def _live(self, group: int, request_id: str, table: list[int]) -> list[int]:
        first = self._first_live[group].get(request_id, 0)
        return table[first:] if first else table

    # --- prefix cache -----------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> PrefixHit:
        """The longest prefix of token_ids cached in every group, in whole blocks.

        Never the whole sequence: the last token is always computed, so that
        its logits exist to sample from. A sliding group is walked from the
        start too (a block's key names its parent), but takes only the blocks
        that the first window after the hit reaches.
        """
        groups = range(self.num_groups)
        if not self.enable_prefix_caching:
            return PrefixHit(0, [[] for _ in groups], [0 for _ in groups])
        bs = self.block_size
        limit = (len(token_ids) - 1) // bs
        found = []
        for g in groups:
            hits: list[int] = []
            parent = None
            for i in range(limit):
                block = self.pool.cached.get(self.pool.child_key(parent, tuple(token_ids[i * bs : (i + 1) * bs]), g))
                if block is None:
                    break
                hits.append(block)
                parent = block
            limit = len(hits)  # later groups need look no further
            found.append(hits)
        hit = PrefixHit(limit * bs)
        for g, hits in enumerate(found):
            hits = hits[:limit]
            first = self._first_needed_block(g, limit * bs)
            hit.blocks.append([NULL_BLOCK] * first + hits[first:])
            hit.first_live.append(first)
        return hit

    def _first_needed_block(self, group: int, num_computed: int) -> int:
        """The first block that a query at position num_computed (or later) still reads in this group."""
        w = self.windows[group]
        if w is None or num_computed < w:
            return 0
        return (num_computed - w + 1) // self.block_size

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
        """Offer the request's newly full, computed blocks to the prefix cache, in every group."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for g, tables in enumerate(self.tables):
            table = tables.get(request_id)
            if table is None:
                continue
            start = self._num_cached[g].get(request_id, 0)
            end = min(num_computed_tokens // bs, len(table))
            first_live = self._first_live[g].get(request_id, 0)
            for i in range(start, end):
                if i - 1 < first_live and i > 0:
                    break  # its parent already left the window: the chain cannot be named
                parent = table[i - 1] if i else None
                block_id = table[i]
                canonical = self.pool.cache(block_id, self.pool.child_key(parent, tuple(token_ids[i * bs : (i + 1) * bs]), g))
                if canonical != block_id:
                    # The same prefix is cached in another block: share that one and free this
                    # duplicate, so equal prefixes are one set of blocks (less memory, and
                    # cascade attention sees them as shared).
                    self.pool.incref(canonical)
                    table[i] = canonical
                    self.pool.decref(block_id)
            if end > start:
                self._num_cached[g][request_id] = end

    # --- allocation -------------------------------------------------------
    def allocate_slots(self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
                       hit: PrefixHit | None = None) -> bool:
        """Make room to compute num_new_tokens after num_computed_tokens.

        hit: a prefix hit (from find_cached_prefix) that becomes the start of
        a new request's tables. All or nothing: when the pool is short, nothing
        changes but the blocks that windows have left, and the caller (the
        scheduler) decides whom to preempt.
        """
        self._free_left_behind(request_id, num_computed_tokens)
        plans = []
        wanted = 0
        for g, tables in enumerate(self.tables):
            table = tables.get(request_id, [])
            cached = hit.blocks[g] if hit is not None else ()
            cow = self._shared_block_to_write(table, num_computed_tokens, num_new_tokens)
            new = max(0, self.blocks_needed(num_computed_tokens + num_new_tokens) - len(table) - len(cached))
            live = cached[hit.first_live[g]:] if cached else ()
            reviving = sum(1 for b in live if self.pool.ref_cnt[b] == 0)  # cached but free: taken out of the queue
            wanted += new + reviving + (cow is not None)
            plans.append((table, cached, live, cow, new))
        if wanted > self.pool.num_free_blocks:
            return False
        # Every group's cached blocks leave the free queue before any group allocates: layer i of
        # every group stores into one tensor, so one group's new block must not be (evict) a
        # cached block that another group's hit is about to read.
        for _, _, live, _, _ in plans:
            for block_id in live:
                self.pool.incref(block_id)
        for g, (table, cached, live, cow, new) in enumerate(plans):
            if request_id not in self.tables[g]:
                self.tables[g][request_id] = table
            if cached:
                table.extend(cached)
                self._num_cached[g][request_id] = len(table)
                if hit.first_live[g]:
                    self._first_live[g][request_id] = hit.first_live[g]
            if cow is not None:
                src = table[cow]
                (dst,) = self.pool.allocate(1)
                self._copies.append((src, dst))
                self.pool.decref(src)
                table[cow] = dst
            if new:
                table.extend(self.pool.allocate(new))
        self._num_tokens[request_id] = max(num_computed_tokens + num_new_tokens, self._num_tokens.get(request_id, 0))
        self._note_peak()
        return True

    def _free_left_behind(self, request_id: str, num_computed: int) -> None:
        """In sliding groups, give back the blocks that no query from num_computed on reads."""
        for g, w in enumerate(self.windows):
            if w is None:
                continue
            table = self.tables[g].get(request_id)
            first = self._first_live[g].get(request_id, 0)
            needed = self._first_needed_block(g, num_computed)
            if table is None or needed <= first:
                continue
            for i in range(first, needed):
                self.pool.decref(table[i])
                table[i] = NULL_BLOCK
            self._first_live[g][request_id] = needed

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
        if child_id in self.tables[0]:
            raise ValueError(f"request {child_id!r} already has blocks")
        for g, tables in enumerate(self.tables):
            table = list(tables.get(parent_id, []))
            for block_id in self._live(g, parent_id, table):
                self.pool.incref(block_id)
            tables[child_id] = table
            self._num_cached[g][child_id] = self._num_cached[g].get(parent_id, 0)
            if parent_id in self._first_live[g]:
                self._first_live[g][child_id] = self._first_live[g][parent_id]
        self._num_tokens[child_id] = self._num_tokens.get(parent_id, 0)
        self._note_peak()

    def free(self, request_id: str) -> None:
        """Give back every block of the request; a no-op for unknown ids."""
        self._num_tokens.pop(request_id, None)
        for g, tables in enumerate(self.tables):
            table = tables.pop(request_id, None)
            self._num_cached[g].pop(request_id, None)
            first = self._first_live[g].pop(request_id, 0)
            if table is None:
                continue
            # Tail first: the end of a sequence is the part least likely to be
            # shared by a later prefix, so it is reused (evicted) first.
            for block_id in reversed(table[first:]):
                self.pool.decref(block_id)

    # --- stats and invariants ---------------------------------------------
    def stats(self) -> KVCacheStats:
        used = self.num_blocks - self.num_free_blocks
        # Tokens held, each used block counted once however many tables share
        # it. It runs after every step while stats are on, so it visits only
        # each table's tail (the blocks not yet full), not every block: a used
        # block holds block_size tokens unless every table entry that holds it
        # (its ref count) is a tail entry, and then it holds its fullest one.
        bs = self.block_size
        tail_fill: dict[int, int] = {}
        tail_refs: dict[int, int] = {}
        for g, tables in enumerate(self.tables):
            first_live = self._first_live[g]
            for request_id, table in tables.items():
                n = self._num_tokens.get(request_id, 0)
                for i in range(max(first_live.get(request_id, 0), n // bs), len(table)):
                    block_id = table[i]
                    tail_fill[block_id] = max(tail_fill.get(block_id, 0), n - i * bs if n > i * bs else 0)
                    tail_refs[block_id] = tail_refs.get(block_id, 0) + 1
        ref_cnt = self.pool.ref_cnt
        slots = used * bs
        tokens = slots - sum(bs - fill for block_id, fill in tail_fill.items() if tail_refs[block_id] == ref_cnt[block_id])
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
        owner: dict[int, int] = {}  # block -> the one group whose tables hold it
        for g, tables in enumerate(self.tables):
            for request_id, table in tables.items():
                for block_id in self._live(g, request_id, table):
                    refs[block_id] += 1
                    assert owner.setdefault(block_id, g) == g, f"block {block_id} is in groups {owner[block_id]} and {g} at once"
                assert self._num_tokens[request_id] <= len(table) * self.block_size
                assert self._first_live[g].get(request_id, 0) <= len(table)
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
