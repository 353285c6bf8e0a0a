"""Property test of the KV cache manager: random interleavings of allocate, append, fork,
copy-on-write, free and prefix lookups keep DESIGN.md's invariants, and every sequence
reads back exactly its own tokens through its block table.

A shadow memory stands in for the KV tensors: each slot holds the token whose key and
value were written there. Copy-on-write pairs are applied before each write, as the model
runner applies them before a step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.engine.kv_cache import KVCacheManager

OPS = st.lists(
    st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 1000), st.integers(1, 40)),
    min_size=1,
    max_size=60,
)


class Shadow:
    def __init__(self, num_blocks: int, block_size: int, vocab: int, group_windows=(None,)):
        self.kv = KVCacheManager(num_blocks, block_size, group_windows=group_windows)
        self.bs = block_size
        self.vocab = vocab
        # slot -> what its key/value depend on: the whole prefix up to that token.
        self.memory: dict[int, tuple[int, ...]] = {}
        self.tokens: dict[str, list[int]] = {}  # each live sequence's tokens (all computed)
        self.next_id = 0

    def slot(self, rid: str, pos: int) -> int:
        table = self.kv.get_block_table(rid)
        return table[pos // self.bs] * self.bs + pos % self.bs

    def apply_copies(self) -> None:
        for src, dst in self.kv.take_copies():
            for off in range(self.bs):
                if src * self.bs + off in self.memory:
                    self.memory[dst * self.bs + off] = self.memory[src * self.bs + off]
                else:
                    self.memory.pop(dst * self.bs + off, None)

    def compute(self, rid: str, new_tokens: list[int]) -> bool:
        """Allocate and 'write' new tokens after the ones already computed; False if the pool is short."""
        have = self.tokens[rid]
        if not self.kv.allocate_slots(rid, len(have), len(new_tokens)):
            return False
        self.apply_copies()
        start = len(have)
        have.extend(new_tokens)
        for p in range(start, len(have)):
            self.memory[self.slot(rid, p)] = tuple(have[: p + 1])
        self.kv.cache_full_blocks(rid, have, len(have))
        return True

    def new(self, tokens: list[int]) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        hit = self.kv.find_cached_prefix(tokens)
        # A prefix hit must hold exactly this prefix, block for block.
        for b, block_id in enumerate(hit.blocks[0]):
            got = [self.memory.get(block_id * self.bs + o) for o in range(self.bs)]
            assert got == [tuple(tokens[: b * self.bs + o + 1]) for o in range(self.bs)], "prefix hit with another prefix"
        n_hit = hit.num_tokens
        assert n_hit < len(tokens)
        if not self.kv.allocate_slots(rid, n_hit, len(tokens) - n_hit, hit):
            return
        self.apply_copies()
        for p in range(n_hit, len(tokens)):
            self.memory[self.slot(rid, p)] = tuple(tokens[: p + 1])
        self.tokens[rid] = list(tokens)
        self.kv.cache_full_blocks(rid, self.tokens[rid], len(tokens))

    def check(self) -> None:
        self.kv.check_invariants()
        assert self.kv.stats().num_tokens == tokens_held(self.kv)
        for rid, toks in self.tokens.items():
            read = [self.memory.get(self.slot(rid, p)) for p in range(len(toks))]
            assert read == [tuple(toks[: p + 1]) for p in range(len(toks))], f"{rid} reads back other tokens through its block table"


def tokens_held(kv: KVCacheManager) -> int:
    """The tokens in used blocks, counted slot by slot over every live table entry: what stats() counts from the tails."""
    filled: dict[int, int] = {}
    for g, tables in enumerate(kv.tables):
        for rid, table in tables.items():
            n = kv._num_tokens.get(rid, 0)
            for i in range(kv._first_live[g].get(rid, 0), len(table)):
                filled[table[i]] = max(filled.get(table[i], 0), min(kv.block_size, max(0, n - i * kv.block_size)))
    return sum(filled.values())


@settings(max_examples=150, deadline=None)
@given(ops=OPS, block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 40), vocab=st.sampled_from([2, 3, 50]),
       window=st.sampled_from([None, 3, 8]))
def test_random_interleavings_keep_invariants_and_contents(ops, block_size, num_blocks, vocab, window):
    # A tiny vocabulary makes shared prefixes (and so prefix hits) common; a
    # second, sliding-window group (window) holds only its window's blocks.
    sh = Shadow(num_blocks, block_size, vocab, (None,) if window is None else (None, window))
    for op, a, b in ops:
        live = sorted(sh.tokens)
        if op == "new" or not live:
            tokens = [(a * 7 + i * (a % 3 + 1)) % vocab for i in range(b)] if vocab > 3 else [(a >> (i % 10)) % vocab for i in range(b)]
            sh.new(tokens)
        else:
            rid = live[a % len(live)]
            if op == "append":
                sh.compute(rid, [(a + i) % vocab for i in range(b % 5 + 1)])
            elif op == "fork":
                child = f"r{sh.next_id}"
                sh.next_id += 1
                sh.kv.fork(rid, child)
                sh.tokens[child] = list(sh.tokens[rid])
            else:
                sh.kv.free(rid)
                del sh.tokens[rid]
        sh.check()
    for rid in list(sh.tokens):
        sh.kv.free(rid)
    sh.kv.check_invariants()
    assert sh.kv.num_free_blocks == num_blocks
