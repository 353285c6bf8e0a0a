"""Scripted operations on the KV cache manager, with the exact block ids expected after each.

The property test (test_kv_cache_property.py) checks that the invariants hold and
that every sequence reads back its own tokens; it cannot tell a correct LRU from
a merely consistent one. These scripts pin down the algorithm itself, as vLLM's
v1 prefix-caching tests do: which id a fresh pool hands out, the order in which
freed and cached blocks are reused, which ids a prefix hit, a fork and a
copy-on-write produce, and which entries of a sliding-window table become
NULL_BLOCK. Every expected id below is derived in a comment from the rules in
kv_cache.py's docstring, so a failure says which rule moved.

Block size 4 throughout; `toks(n, base)` is n distinct tokens, so that two
prompts share a prefix only when they are meant to.
"""

from __future__ import annotations

from pagedllm.engine.kv_cache import NULL_BLOCK, KVCacheManager

BS = 4


def toks(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def compute(kv: KVCacheManager, rid: str, tokens: list[int], done: int = 0, hit=None) -> None:
    """Allocate and 'compute' tokens[done:], then offer the full blocks to the prefix cache, as a step does."""
    assert kv.allocate_slots(rid, done, len(tokens) - done, hit)
    kv.cache_full_blocks(rid, tokens, len(tokens))
    kv.check_invariants()


def refs(kv: KVCacheManager, ids) -> list[int]:
    return [kv.pool.ref_cnt[b] for b in ids]


def test_a_fresh_pool_hands_out_ids_in_order_and_reuses_the_oldest_freed_first():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    assert kv.allocate_slots("a", 0, 10)  # 3 blocks: the front of the queue 0..7
    assert kv.get_block_table("a") == [0, 1, 2]
    assert kv.allocate_slots("b", 0, 5)
    assert kv.get_block_table("b") == [3, 4]
    assert kv.allocate_slots("a", 10, 3)  # 13 tokens: one more block, the next in line
    assert kv.get_block_table("a") == [0, 1, 2, 5]
    # free gives a's blocks back tail first: queue is now 6, 7, then 5, 2, 1, 0.
    kv.free("a")
    assert kv.num_free_blocks == 6 and refs(kv, [0, 1, 2, 5]) == [0, 0, 0, 0]
    assert kv.allocate_slots("c", 0, 16)  # blocks never used come before freed ones
    assert kv.get_block_table("c") == [6, 7, 5, 2]
    kv.free("b")  # queue: 1, 0, 4, 3
    assert kv.allocate_slots("d", 0, 12)
    assert kv.get_block_table("d") == [1, 0, 4]
    kv.check_invariants()


def test_a_pool_too_short_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    compute(kv, "a", toks(12))  # [0, 1, 2]
    assert not kv.allocate_slots("b", 0, 8)  # needs 2, 1 free
    assert "b" not in kv.block_tables and kv.num_free_blocks == 1
    assert not kv.allocate_slots("a", 12, 5)  # needs 2 more
    assert kv.get_block_table("a") == [0, 1, 2]
    assert kv.allocate_slots("a", 12, 4)  # exactly the one free block
    assert kv.get_block_table("a") == [0, 1, 2, 3]
    kv.check_invariants()


def test_a_prefix_hit_returns_the_cached_ids_and_never_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = toks(10)
    compute(kv, "a", prompt)  # [0, 1, 2]; blocks 0 and 1 are full and cached
    assert kv.stats().num_cached_blocks == 2
    # While a still runs: b shares blocks 0 and 1 (ref counts 2) and gets block 3 for its tail.
    hit = kv.find_cached_prefix(toks(8) + [100, 101])
    assert (hit.num_tokens, hit.blocks, hit.first_live) == (8, [[0, 1]], [0])
    compute(kv, "b", toks(8) + [100, 101], done=8, hit=hit)
    assert kv.get_block_table("b") == [0, 1, 3]
    assert refs(kv, [0, 1, 2, 3]) == [2, 2, 1, 1]
    # A prompt of exactly two blocks hits one only: its last token is computed again for its logits.
    assert kv.find_cached_prefix(toks(8)).blocks == [[0]]
    # A different first block means no hit, whatever follows.
    assert kv.find_cached_prefix([99] + toks(9, 1)).num_tokens == 0
    kv.free("a")
    kv.free("b")  # queue: 4..7, 2, then b's 3, 1, 0 (0 and 1 now free but still findable)
    assert kv.num_free_blocks == 8 and kv.stats().num_cached_blocks == 2
    # A hit on free cached blocks takes them out of the queue; the new block is the queue's front.
    hit = kv.find_cached_prefix(prompt + [7])
    assert hit.blocks == [[0, 1]]
    compute(kv, "c", prompt + [7], done=8, hit=hit)
    assert kv.get_block_table("c") == [0, 1, 4]
    assert kv.allocate_slots("d", 0, 16, None)  # the rest of the queue, in order, skipping 0 and 1
    assert kv.get_block_table("d") == [5, 6, 7, 2]


def test_cached_blocks_are_evicted_least_recently_freed_first_and_tail_first():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = toks(12, 0), toks(12, 100)
    compute(kv, "a", a)  # [0, 1, 2], all cached
    compute(kv, "b", b)  # [3, 4, 5], all cached
    kv.free("a")  # queue: 6, 7, 2, 1, 0
    kv.free("b")  # queue: 6, 7, 2, 1, 0, 5, 4, 3
    assert kv.find_cached_prefix(a + [1]).blocks == [[0, 1, 2]]
    # c takes the two never-used blocks, then a's (freed first), tail first: a keeps its head.
    assert kv.allocate_slots("c", 0, 16)
    assert kv.get_block_table("c") == [6, 7, 2, 1]
    assert kv.find_cached_prefix(a + [1]).blocks == [[0]]
    assert kv.find_cached_prefix(b + [1]).blocks == [[3, 4, 5]]
    assert kv.stats().num_cached_blocks == 4
    assert kv.allocate_slots("d", 0, 4)  # a's last cached block goes
    assert kv.get_block_table("d") == [0]
    assert kv.find_cached_prefix(a + [1]).num_tokens == 0
    # b's prefix needs its 3 free blocks plus 1 new one, and only 3 are free: all or nothing.
    hit = kv.find_cached_prefix(b + [1])
    assert hit.blocks == [[3, 4, 5]]
    assert not kv.allocate_slots("e", 12, 1, hit)
    assert kv.num_free_blocks == 3 and kv.find_cached_prefix(b + [1]).blocks == [[3, 4, 5]]
    kv.free("d")  # queue: 5, 4, 3, 0
    assert kv.allocate_slots("e", 12, 1, hit)
    assert kv.get_block_table("e") == [3, 4, 5, 0]
    kv.check_invariants()


def test_a_prefix_computed_twice_in_one_step_is_merged_into_the_first_copy():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = toks(10)
    assert kv.allocate_slots("a", 0, 10)  # [0, 1, 2]: nothing cached yet, so b misses too
    assert kv.allocate_slots("b", 0, 10)  # [3, 4, 5]
    kv.cache_full_blocks("a", prompt, 10)  # 0 and 1 become the cached copies
    kv.cache_full_blocks("b", prompt, 10)  # b's 3 and 4 hold the same: b switches to 0 and 1
    assert kv.get_block_table("b") == [0, 1, 5]
    assert refs(kv, [0, 1, 3, 4]) == [2, 2, 0, 0]
    kv.check_invariants()
    assert kv.allocate_slots("c", 0, 12)  # queue: 6, 7, then the dropped copies 3, 4
    assert kv.get_block_table("c") == [6, 7, 3]


def test_fork_shares_every_id_and_the_first_writer_into_a_shared_partial_block_copies_it():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute(kv, "p", toks(6))  # [0, 1]: block 1 holds 2 of 4 tokens
    kv.fork("p", "c1")
    kv.fork("p", "c2")
    assert kv.get_block_table("c1") == kv.get_block_table("c2") == [0, 1]
    assert refs(kv, [0, 1]) == [3, 3]
    # c1 writes position 6 into the shared block 1: it gets a copy in the queue's front, block 2.
    assert kv.allocate_slots("c1", 6, 1)
    assert kv.take_copies() == [(1, 2)]
    assert kv.get_block_table("c1") == [0, 2]
    assert refs(kv, [0, 1, 2]) == [3, 2, 1]
    assert kv.take_copies() == []  # handed over once
    # The parent still shares block 1 with c2, so its write copies too (into 3); then c2 owns 1 alone.
    assert kv.allocate_slots("p", 6, 1)
    assert kv.allocate_slots("c2", 6, 1)
    assert kv.take_copies() == [(1, 3)]
    assert kv.get_block_table("p") == [0, 3] and kv.get_block_table("c2") == [0, 1]
    assert refs(kv, [0, 1, 2, 3]) == [3, 1, 1, 1]
    # Writing on past the copied block needs a new block, not another copy.
    assert kv.allocate_slots("c1", 7, 2)
    assert kv.take_copies() == [] and kv.get_block_table("c1") == [0, 2, 4]
    kv.check_invariants()
    kv.free("p")
    kv.free("c1")
    kv.free("c2")
    assert kv.num_free_blocks == 8


def test_a_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute(kv, "p", toks(8))  # [0, 1], both full
    kv.fork("p", "c")
    assert kv.allocate_slots("c", 8, 1) and kv.allocate_slots("p", 8, 1)
    assert kv.take_copies() == []
    assert kv.get_block_table("c") == [0, 1, 2] and kv.get_block_table("p") == [0, 1, 3]
    assert refs(kv, [0, 1, 2, 3]) == [2, 2, 1, 1]


def test_a_sliding_group_frees_exactly_the_blocks_that_left_the_window():
    # Group 0 attends to everything, group 1 to the last 8 positions: the query at
    # position p reads p-7..p, so block i is left behind once p - 7 >= 4 * (i + 1).
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False, group_windows=(None, 8))
    assert kv.allocate_slots("a", 0, 10)  # each group's blocks in group order
    assert kv.get_block_tables("a") == [[0, 1, 2], [3, 4, 5]]
    assert kv.allocate_slots("a", 10, 1)  # query 10 reads 3..10: block 0 still needed
    assert kv.get_block_tables("a") == [[0, 1, 2], [3, 4, 5]]
    assert kv.allocate_slots("a", 11, 1)  # query 11 reads 4..11: group 1's first block goes back
    assert kv.get_block_tables("a") == [[0, 1, 2], [NULL_BLOCK, 4, 5]]
    assert kv.pool.is_free(3) and kv.num_free_blocks == 11
    # Position 12 opens a fourth block in each group: the front of the queue (6..15, then 3).
    assert kv.allocate_slots("a", 12, 1)
    assert kv.get_block_tables("a") == [[0, 1, 2, 6], [NULL_BLOCK, 4, 5, 7]]
    # A fork shares the live blocks only; the placeholder is copied but holds no reference.
    kv.fork("a", "b")
    assert kv.get_block_tables("b") == kv.get_block_tables("a")
    assert refs(kv, [0, 3, 4, 5, 7]) == [2, 0, 2, 2, 2]
    kv.free("b")
    # A chunk of 4 from position 13: its first query (13) reads 6..13, still in block 1; 17 tokens need a fifth block each.
    assert kv.allocate_slots("a", 13, 4)
    assert kv.get_block_tables("a") == [[0, 1, 2, 6, 8], [NULL_BLOCK, 4, 5, 7, 9]]
    assert kv.allocate_slots("a", 17, 1)  # query 17 reads 10..17: block 1 (4..7) leaves, block 2 (8..11) stays
    assert kv.get_block_tables("a") == [[0, 1, 2, 6, 8], [NULL_BLOCK, NULL_BLOCK, 5, 7, 9]]
    assert kv.pool.is_free(4) and refs(kv, [5, 7, 9]) == [1, 1, 1]
    kv.check_invariants()
    # free gives back only the live entries, group by group, tail first: queue 10..15, 3, 4, 8, 6, 2, 1, 0, 9, 7, 5.
    kv.free("a")
    assert kv.num_free_blocks == 16
    assert kv.allocate_slots("c", 0, 32)  # 8 blocks in each group take the whole queue in order
    assert kv.get_block_tables("c") == [[10, 11, 12, 13, 14, 15, 3, 4], [8, 6, 2, 1, 0, 9, 7, 5]]
    kv.check_invariants()


def test_a_prefix_hit_in_a_sliding_group_takes_only_the_blocks_the_window_reaches():
    kv = KVCacheManager(num_blocks=16, block_size=BS, group_windows=(None, 8))
    prompt = toks(13)
    compute(kv, "a", prompt)  # [0, 1, 2, 3] and [4, 5, 6, 7]; three full blocks cached in each
    kv.free("a")  # queue: 8..15, 3, 2, 1, 0, 7, 6, 5, 4
    # b's first query sits at 12 and reads 5..12: group 1 needs its blocks 1 and 2 only.
    hit = kv.find_cached_prefix(toks(12) + [50, 51])
    assert (hit.num_tokens, hit.blocks, hit.first_live) == (12, [[0, 1, 2], [NULL_BLOCK, 5, 6]], [0, 1])
    compute(kv, "b", toks(12) + [50, 51], done=12, hit=hit)
    assert kv.get_block_tables("b") == [[0, 1, 2, 8], [NULL_BLOCK, 5, 6, 9]]
    # Block 4 stays free (and findable): the hit did not take it out of the queue.
    assert kv.pool.is_free(4) and refs(kv, [0, 5, 6]) == [1, 1, 1]
    kv.check_invariants()


def test_one_groups_new_block_never_evicts_a_block_that_another_groups_hit_takes():
    # Layer i of every group stores into the same tensor (worker/kv_cache_groups.py), so a block
    # id must belong to one group at a time. Here the queue's front, once group 0 has taken its
    # cached blocks out, is group 1's cached block 5: group 0's new block must not be it.
    kv = KVCacheManager(num_blocks=8, block_size=BS, group_windows=(None, 8))
    compute(kv, "a", toks(12))  # [0, 1, 2] and [3, 4, 5], all cached
    assert kv.allocate_slots("x", 0, 1)  # [6] and [7]
    kv.free("a")
    kv.free("x")  # queue: 2, 1, 0, 5, 4, 3, 6, 7
    hit = kv.find_cached_prefix(toks(12) + [50])
    assert hit.blocks == [[0, 1, 2], [NULL_BLOCK, 4, 5]]
    assert kv.allocate_slots("b", 12, 1, hit)
    # Both groups' hits leave the queue first (3, 6, 7 left); then group 0 and group 1 take one new block each.
    assert kv.get_block_tables("b") == [[0, 1, 2, 3], [NULL_BLOCK, 4, 5, 6]]
    assert refs(kv, [0, 1, 2, 3, 4, 5, 6, 7]) == [1, 1, 1, 1, 1, 1, 1, 0]
    kv.check_invariants()


def test_a_fork_in_two_groups_reports_one_copy_per_group_in_group_order():
    kv = KVCacheManager(num_blocks=8, block_size=BS, group_windows=(None, None))
    compute(kv, "p", toks(6))  # [0, 1] and [2, 3]; the second block of each is half full
    kv.fork("p", "c")
    assert kv.allocate_slots("c", 6, 1)
    assert kv.take_copies() == [(1, 4), (3, 5)]
    assert kv.get_block_tables("c") == [[0, 4], [2, 5]] and kv.get_block_tables("p") == [[0, 1], [2, 3]]
    kv.check_invariants()
