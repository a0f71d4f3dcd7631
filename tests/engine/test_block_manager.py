"""The block manager (engine/block_manager.py): ownership, prefix sharing, the LRU of cached blocks.

Two parts. A Hypothesis state machine drives one small manager through random allocations (token
sequences from a two- or three-letter alphabet, so prefixes collide all the time), growth,
commits, sharing, releases, preemption and resumption, forced evictions and cache resets, against
a reference model written from the module docstring: prefixes as token tuples (not hashes), an
LRU as a list, and the cache content as the token id written in every slot. After every step the
manager's state must equal the model's, and the safety rules must hold (one writer per private
block, no referenced block free or cached, every shared block holding exactly the tokens of the
prefix that matched it). Then plain tests pin each rule of the docstring to its value.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from common.kv_hash import block_hashes
from engine.block_manager import BlockError, BlockManager, CacheStats
from engine.kv_cache import OutOfBlocks, blocks_needed

pytestmark = pytest.mark.unit

ROOT = b"test-root"


# ---- the state machine ---------------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """``self.m`` is the manager under test; everything else is the reference model."""

    @initialize(num_blocks=st.integers(12, 24), block_size=st.integers(2, 4),
                alphabet=st.integers(2, 3), prefix_cache=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, alphabet, prefix_cache):
        self.m = BlockManager(num_blocks, block_size, root=ROOT, prefix_cache=prefix_cache)
        self.bs, self.total, self.pc, self.alphabet = block_size, num_blocks - 1, prefix_cache, alphabet
        self.tables: dict[str, list[int]] = {}      # owner -> block table
        self.done: dict[str, int] = {}              # owner -> blocks whose prefix hash it holds
        self.refs: Counter[int] = Counter()
        self.registry: dict[tuple, int] = {}        # prefix (whole blocks) -> the block holding it
        self.prefix_of: dict[int, tuple] = {}       # hashed block -> its prefix
        self.lru: list[int] = []                    # cached blocks, least recent first
        self.content: dict[int, list] = {}          # block -> token id written in each slot
        self.running: dict[str, list[int]] = {}     # owner -> tokens computed (KV written)
        self.slots: dict[str, int] = {}
        self.preempted: dict[str, list[int]] = {}
        self.released: list[str] = []
        self.history: list[list[int]] = []          # sequences seen, to draw shared prefixes from
        self.stats = CacheStats()
        self.next_owner = 0

    # ---- the reference model -----------------------------------------------------------------
    def free_set(self) -> set[int]:
        return set(range(1, self.total + 1)) - set(self.refs) - set(self.lru)

    def model_match(self, tokens, limit) -> list[int]:
        out = []
        if not self.pc:
            return out
        for i in range(limit // self.bs):
            block = self.registry.get(tuple(tokens[:(i + 1) * self.bs]))
            if block is None:
                break
            out.append(block)
        return out

    def model_new_blocks(self, got: list[int], k: int) -> None:
        """``got``: the ``k`` new private blocks the manager handed out; evicts what the model says."""
        free = self.free_set()
        evicted = []
        for _ in range(max(0, k - len(free))):
            block = self.lru.pop(0)
            del self.registry[self.prefix_of.pop(block)]
            evicted.append(block)
            self.stats.evictions += 1
        assert len(got) == k == len(set(got))
        assert set(got) <= free | set(evicted), "a new block was neither free nor evicted"
        assert set(evicted) <= set(got)
        for block in got:
            assert block not in self.refs, "a referenced block was handed out again"
            self.refs[block] = 1
            self.content[block] = [None] * self.bs

    def write(self, owner: str, start: int, end: int) -> None:
        """The owner computes the KV of its tokens ``start:end`` into its private blocks."""
        table, tokens = self.tables[owner], self.running[owner]
        for j in range(start, end):
            block = table[j // self.bs]
            assert block not in self.prefix_of, f"{owner} writes into hashed (immutable) block {block}"
            assert self.refs[block] == 1, f"{owner} writes into block {block}, which others hold"
            self.content[block][j % self.bs] = tokens[j]

    def snapshot(self):
        m = self.m
        return ({o: m.table(o) for o in m.owners()}, list(m._free), list(m._lru), dict(m._hash_of),
                dict(m._refs), dataclasses.astuple(m.stats))

    def new_owner(self) -> str:
        self.next_owner += 1
        return f"o{self.next_owner}"

    def draw_tokens(self, data, extra_max: int) -> list[int]:
        prefix: list[int] = []
        sources = self.history + [t for _, t in sorted(self.running.items())]
        if sources and data.draw(st.integers(0, 3), label="shared prefix"):
            base = data.draw(st.sampled_from(sources), label="prefix source")
            prefix = list(base[:data.draw(st.integers(0, len(base)), label="cut")])
        suffix = data.draw(st.lists(st.integers(0, self.alphabet - 1), max_size=extra_max), label="suffix")
        return prefix + suffix

    def do_allocate(self, owner, tokens, num_slots, max_cached=None, watermark=0) -> bool:
        """Allocate in the manager and the model, check both agree; True when it succeeded."""
        seq = tokens or []
        limit = min(len(seq), len(seq) if max_cached is None else max_cached, num_slots)
        hits = self.model_match(seq, limit) if tokens is not None else []
        new = blocks_needed(num_slots, self.bs) - len(hits)
        revived = sum(1 for b in hits if b in self.lru)
        refuse = new + watermark > len(self.free_set()) + len(self.lru) - revived
        before = self.snapshot()
        try:
            cached = self.m.allocate(owner, tokens, num_slots, max_cached=max_cached, watermark=watermark)
        except OutOfBlocks:
            assert refuse, "allocate refused although the blocks were there"
            assert self.snapshot() == before, "a refused allocate took something"
            return False
        assert not refuse, "allocate succeeded beyond the available blocks and watermark"
        assert cached == len(hits) * self.bs, f"allocate says {cached} tokens cached, model {len(hits) * self.bs}"
        assert cached % self.bs == 0 and cached <= limit
        table = self.m.table(owner)
        assert table[:len(hits)] == hits, "the prefix hit is not the cached blocks"
        for b in hits:
            if b in self.lru:
                self.lru.remove(b)
            self.refs[b] += 1
        self.model_new_blocks(table[len(hits):], new)
        self.tables[owner], self.done[owner] = table, len(hits)
        self.running[owner], self.slots[owner] = list(seq), num_slots
        if tokens is not None and self.pc:
            self.stats.queried_tokens += len(seq)
            self.stats.hit_tokens += cached
        self.write(owner, cached, len(seq))               # prefill the uncached rest
        return True

    def do_commit(self, owner, n) -> None:
        tokens = self.running[owner][:n]
        got = self.m.commit(owner, tokens)
        if not self.pc:
            assert got == 0
            return
        table, done = self.tables[owner], self.done[owner]
        for i in range(done, n // self.bs):
            prefix, block = tuple(tokens[:(i + 1) * self.bs]), table[i]
            if prefix not in self.registry and block not in self.prefix_of:
                self.registry[prefix], self.prefix_of[block] = block, prefix
        self.done[owner] = max(done, n // self.bs)
        assert got == self.done[owner]

    def do_release(self, owner) -> list[int]:
        self.m.release(owner)
        for b in reversed(self.tables.pop(owner)):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                del self.refs[b]
                if b in self.prefix_of:
                    self.lru.append(b)
        del self.done[owner], self.slots[owner]
        tokens = self.running.pop(owner)
        self.history.append(tokens)
        return tokens

    # ---- rules -------------------------------------------------------------------------------
    @rule(data=st.data())
    def allocate(self, data):
        tokens = self.draw_tokens(data, 4 * self.bs)
        if data.draw(st.integers(0, 9), label="no tokens") == 0:
            tokens = None
        seq = tokens or []
        num_slots = len(seq) + data.draw(st.integers(0, 2 * self.bs), label="headroom")
        max_cached = data.draw(st.none() | st.integers(0, len(seq)), label="max_cached")
        watermark = data.draw(st.sampled_from([0, 0, 0, 1, 3]), label="watermark")
        self.do_allocate(self.new_owner(), tokens, num_slots, max_cached, watermark)

    @precondition(lambda self: self.lru)
    @rule(data=st.data())
    def allocate_forcing_eviction(self, data):
        """An allocation larger than the free list: it must evict cached blocks (oldest first)."""
        tokens = self.draw_tokens(data, 2 * self.bs)
        free, cached = len(self.free_set()), len(self.lru)
        lo = max(free + 1, blocks_needed(len(tokens), self.bs))
        blocks = data.draw(st.integers(lo, max(lo, free + cached)), label="blocks")
        self.do_allocate(self.new_owner(), tokens, max(blocks * self.bs, len(tokens)))

    @precondition(lambda self: any(self.done[o] for o in self.running))
    @rule(data=st.data())
    def share(self, data):
        """A second owner allocating another's committed prefix gets the same blocks."""
        other = data.draw(st.sampled_from(sorted(o for o in self.running if self.done[o])), label="other")
        base = self.running[other]
        n = data.draw(st.integers(self.done[other] * self.bs, len(base)), label="prefix")
        tokens = base[:n] + data.draw(st.lists(st.integers(0, self.alphabet - 1), max_size=self.bs))
        # the other's leading blocks that are the registered holders of their prefixes
        mine = 0
        while (mine < n // self.bs and self.pc and
               self.registry.get(tuple(base[:(mine + 1) * self.bs])) == self.tables[other][mine]):
            mine += 1
        owner = self.new_owner()
        if self.do_allocate(owner, tokens, len(tokens) + 1):
            assert self.m.table(owner)[:mine] == self.tables[other][:mine], "the shared prefix is not shared"

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def grow(self, data):
        owner = data.draw(st.sampled_from(sorted(self.running)), label="owner")
        more = data.draw(st.lists(st.integers(0, self.alphabet - 1), max_size=2 * self.bs), label="tokens")
        tokens = self.running[owner]
        num_slots = max(self.slots[owner], len(tokens) + len(more))
        num_slots += data.draw(st.integers(0, self.bs), label="headroom")
        need = blocks_needed(num_slots, self.bs) - len(self.tables[owner])
        before = self.snapshot()
        try:
            added = self.m.grow(owner, num_slots)
        except OutOfBlocks:
            assert need > len(self.free_set()) + len(self.lru), "grow refused although blocks were there"
            assert self.snapshot() == before, "a refused grow took something"
            return
        assert need <= len(self.free_set()) + len(self.lru)
        assert added == max(need, 0)
        table = self.m.table(owner)
        assert table[:len(self.tables[owner])] == self.tables[owner], "grow changed existing blocks"
        self.model_new_blocks(table[len(self.tables[owner]):], added)
        self.tables[owner], self.slots[owner] = table, num_slots
        start = len(tokens)
        tokens += more
        self.write(owner, start, len(tokens))             # decode steps

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def commit(self, data):
        owner = data.draw(st.sampled_from(sorted(self.running)), label="owner")
        self.do_commit(owner, data.draw(st.integers(0, len(self.running[owner])), label="n"))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release(self, data):
        owner = data.draw(st.sampled_from(sorted(self.running)), label="owner")
        self.do_release(owner)
        self.released.append(owner)

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def release_twice(self, data):
        owner = data.draw(st.sampled_from(self.released), label="owner")
        before = self.snapshot()
        with pytest.raises(BlockError):
            self.m.release(owner)
        assert self.snapshot() == before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data):
        owner = data.draw(st.sampled_from(sorted(self.running)), label="owner")
        self.do_commit(owner, len(self.running[owner]))
        self.preempted[owner] = self.do_release(owner)

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def resume(self, data):
        """Allocate again with the preempted tokens: the cached count is what is still cached."""
        owner = data.draw(st.sampled_from(sorted(self.preempted)), label="owner")
        tokens = self.preempted[owner]
        headroom = data.draw(st.integers(0, self.bs), label="headroom")
        if self.do_allocate(owner, list(tokens), len(tokens) + headroom):
            del self.preempted[owner]

    @rule()
    def reset_cache(self):
        n = len(self.lru)
        assert self.m.reset_cache() == n
        for b in self.lru:
            del self.registry[self.prefix_of.pop(b)]
        self.stats.evictions += n
        self.lru.clear()

    @rule(data=st.data())
    def match(self, data):
        tokens = self.draw_tokens(data, 2 * self.bs)
        before = self.snapshot()
        assert self.m.match(tokens) == len(self.model_match(tokens, len(tokens))) * self.bs
        assert self.snapshot() == before, "match took something"

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def manager_consistent(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        m.check()
        assert m.free_blocks + m.cached_blocks + m.used_blocks == m.total == self.total
        assert m.available_blocks == m.free_blocks + m.cached_blocks

    @invariant()
    def matches_model(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        assert sorted(m.owners()) == sorted(self.tables)
        assert {o: m.table(o) for o in self.tables} == self.tables
        assert list(m._lru) == self.lru, "LRU order differs from the model's"
        assert set(m._free) == self.free_set()
        assert dict(m._refs) == dict(self.refs)
        assert set(m._hash_of) == set(self.prefix_of)
        assert len(m._by_hash) == len(self.registry)
        assert m.stats == self.stats
        if not self.pc:
            assert not self.registry and not self.lru

    @invariant()
    def one_writer_per_private_block(self):
        if not hasattr(self, "m"):
            return
        holders: Counter[int] = Counter(b for t in self.tables.values() for b in t)
        for owner, table in self.tables.items():
            for b in table:
                assert b != 0, "block 0 handed out"
                if b not in self.prefix_of:
                    assert holders[b] == 1, f"private block {b} of {owner} is in another table"

    @invariant()
    def referenced_never_free_or_cached(self):
        if not hasattr(self, "m"):
            return
        idle = set(self.m._free) | set(self.m._lru)
        for table in self.tables.values():
            assert not idle & set(table), "a referenced block is free or cached"

    @invariant()
    def shared_content_is_the_prefix(self):
        if not hasattr(self, "m"):
            return
        for prefix, b in self.registry.items():
            assert self.content[b] == list(prefix[-self.bs:]), f"hashed block {b} holds other tokens"
        for owner, tokens in self.running.items():
            table = self.tables[owner]
            for j, tok in enumerate(tokens):
                assert self.content[table[j // self.bs]][j % self.bs] == tok, \
                    f"{owner} reads the wrong KV at position {j}"


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_block_manager_state_machine = BlockManagerMachine.TestCase


# ---- plain rules -------------------------------------------------------------------------------
def _prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def _cached(bm: BlockManager, owner: str, tokens: list[int], slots: int | None = None) -> list[int]:
    """Allocate, commit and release ``tokens`` as ``owner``; returns the table it had."""
    bm.allocate(owner, tokens, len(tokens) if slots is None else slots)
    bm.commit(owner, tokens)
    table = bm.table(owner)
    bm.release(owner)
    return table


def test_prefix_hit_is_whole_blocks_and_respects_max_cached_and_num_slots():
    bm = BlockManager(20, 4, ROOT)
    tokens = _prompt(14)                                   # 3 full blocks + 2 tokens
    a = _cached(bm, "a", tokens)
    assert bm.cached_blocks == 3 and bm.free_blocks == 19 - 3
    assert bm.match(tokens) == 12
    assert bm.allocate("b", tokens, 16) == 12
    assert bm.table("b")[:3] == a[:3] and len(bm.table("b")) == 4
    assert bm.allocate("c", tokens, 16, max_cached=11) == 8      # 11 tokens: 2 whole blocks
    assert bm.table("c")[:2] == a[:2] and bm.table("c")[2] != a[2]
    assert bm.allocate("d", tokens, 16, max_cached=3) == 0
    assert bm.allocate("e", tokens, 7) == 4                       # num_slots 7: one whole block
    assert bm.allocate("f", tokens[:12], 12, max_cached=None) == 12   # all of it (caller's choice)
    assert bm.allocate("g", [99] + tokens[1:], 16) == 0           # first block differs: nothing
    bm.check()


def test_partial_last_block_is_never_shared():
    bm = BlockManager(10, 4, ROOT)
    tokens = _prompt(7)
    a = _cached(bm, "a", tokens)
    assert bm.cached_blocks == 1 and bm.free_blocks == 8          # the 3-token tail was freed
    assert bm.allocate("b", tokens, 8) == 4
    b = bm.table("b")
    assert b[0] == a[0]
    # a running owner's partial block isn't shared either, even after its commit
    bm.commit("b", tokens)
    assert bm.allocate("c", tokens, 8) == 4
    assert bm.table("c")[0] == b[0] and bm.table("c")[1] != b[1]
    bm.check()


def test_duplicate_commit_keeps_the_second_block_private():
    bm = BlockManager(10, 2, ROOT)
    tokens = _prompt(4)
    assert bm.allocate("a", tokens, 4) == 0
    assert bm.allocate("b", tokens, 4) == 0                       # nothing committed yet
    a, b = bm.table("a"), bm.table("b")
    assert not set(a) & set(b)
    assert bm.commit("a", tokens) == 2
    assert bm.commit("b", tokens) == 2                            # b holds the hashes, not the blocks
    assert bm.allocate("c", tokens, 4) == 4
    assert bm.table("c") == a                                     # the first committer's blocks
    free = bm.free_blocks
    bm.release("b")
    assert bm.free_blocks == free + 2 and bm.cached_blocks == 0  # b's duplicates are freed
    bm.release("a")
    bm.release("c")
    assert bm.cached_blocks == 2 and bm.match(tokens) == 4
    bm.check()


def test_lru_evicts_least_recently_released_first_and_tails_before_heads():
    bm = BlockManager(7, 2, ROOT)                                 # 6 blocks
    x = _cached(bm, "x", _prompt(6, 0))                           # 3 cached blocks
    y = _cached(bm, "y", _prompt(4, 100))                         # 2 cached blocks, released later
    assert bm.cached_blocks == 5 and bm.free_blocks == 1
    assert list(bm._lru) == [x[2], x[1], x[0], y[1], y[0]]
    bm.allocate("z", None, 4)                                     # 2 blocks: the free one + x's tail
    assert bm.stats.evictions == 1
    assert bm.match(_prompt(6, 0)) == 4 and bm.match(_prompt(4, 100)) == 4
    assert x[2] in bm.table("z")
    bm.release("z")
    bm.allocate("w", None, 8)                                     # 4 blocks: 2 free + x[1], x[0]
    assert bm.stats.evictions == 3
    assert bm.match(_prompt(6, 0)) == 0 and bm.match(_prompt(4, 100)) == 4
    bm.release("w")
    # a hit refreshes: y is taken and released again, so it is now newer than nothing else cached
    assert bm.allocate("y2", _prompt(4, 100), 4) == 4
    bm.release("y2")
    assert list(bm._lru) == [y[1], y[0]]
    assert bm.reset_cache() == 2 and bm.stats.evictions == 5
    assert bm.match(_prompt(4, 100)) == 0 and bm.free_blocks == 6
    bm.check()


def test_grow_evicts_when_the_free_list_is_empty():
    bm = BlockManager(5, 2, ROOT)                                 # 4 blocks
    _cached(bm, "x", _prompt(4))                                  # 2 cached
    bm.allocate("a", [7], 2)                                      # 1 block
    assert bm.free_blocks == 1 and bm.cached_blocks == 2
    assert bm.grow("a", 2) == 0
    assert bm.grow("a", 6) == 2                                   # the free one + one eviction
    assert bm.stats.evictions == 1 and bm.match(_prompt(4)) == 2  # the tail went first
    with pytest.raises(OutOfBlocks):
        bm.grow("a", 12)                                          # 3 more, 1 available
    assert len(bm.table("a")) == 3 and bm.cached_blocks == 1 and bm.stats.evictions == 1
    with pytest.raises(BlockError):
        bm.grow("nobody", 4)
    bm.check()


def test_prefix_cache_off_never_hashes_or_keeps_anything():
    bm = BlockManager(10, 2, ROOT, prefix_cache=False)
    tokens = _prompt(6)
    assert bm.allocate("a", tokens, 6) == 0
    assert bm.commit("a", tokens) == 0
    assert bm.allocate("b", tokens, 6) == 0
    assert not set(bm.table("a")) & set(bm.table("b"))
    bm.release("a")
    bm.release("b")
    assert bm.cached_blocks == 0 and bm.free_blocks == 9
    assert bm.match(tokens) == 0
    assert not bm._hash_of and not bm._by_hash
    assert bm.stats == CacheStats()
    bm.check()


def test_watermark_refusals_take_nothing():
    bm = BlockManager(9, 2, ROOT)                                 # 8 blocks
    _cached(bm, "x", _prompt(4))                                  # 2 cached, 6 free
    assert bm.available_blocks == 8
    with pytest.raises(OutOfBlocks, match="need 7 new KV blocks.*above the watermark of 2"):
        bm.allocate("a", None, 14, watermark=2)                   # 7 + 2 > 8
    assert bm.allocate("a", None, 12, watermark=2) == 0           # 6 + 2 == 8
    bm.release("a")
    # cached hits count as neither new nor available: 2 hits + 5 new, 6 others available
    with pytest.raises(OutOfBlocks, match=r"need 5 new KV blocks for 14 tokens \(2 cached\), 6 of 8"):
        bm.allocate("b", _prompt(4), 14, watermark=2)
    assert bm.allocate("b", _prompt(4), 14, watermark=1) == 4
    assert bm.available_blocks == 1
    assert bm.owners() == ["b"] and bm.stats.queried_tokens == 8 and bm.stats.hit_tokens == 4
    bm.check()


def test_out_of_blocks_and_duplicate_owner_change_nothing():
    bm = BlockManager(5, 4, ROOT)                                 # 4 blocks
    bm.allocate("a", _prompt(9), 9)                               # 3 blocks
    table = bm.table("a")
    with pytest.raises(OutOfBlocks, match="need 2 new KV blocks for 5 tokens"):
        bm.allocate("b", _prompt(5), 5)
    assert bm.free_blocks == 1 and bm.owners() == ["a"] and not bm.holds("b")
    assert bm.stats == CacheStats(queried_tokens=9)
    with pytest.raises(BlockError, match="'a' already holds blocks"):
        bm.allocate("a", _prompt(4), 4)
    assert bm.table("a") == table and bm.free_blocks == 1
    assert bm.allocate("b", _prompt(4), 4) == 0                   # the name is still usable
    bm.check()


def test_release_twice_and_unknown_owners_raise():
    bm = BlockManager(8, 4, ROOT)
    bm.allocate("x", None, 5)
    bm.release("x")
    with pytest.raises(BlockError, match="released twice"):
        bm.release("x")
    with pytest.raises(BlockError):
        bm.release("never")
    with pytest.raises(BlockError):
        bm.table("x")
    with pytest.raises(BlockError):
        bm.commit("x", [1])
    assert bm.free_blocks == 7
    bm.check()


def test_commit_beyond_the_table_raises():
    bm = BlockManager(8, 4, ROOT)
    bm.allocate("x", _prompt(6), 6)
    with pytest.raises(BlockError, match="commit of 9 tokens"):
        bm.commit("x", _prompt(9))
    assert bm.commit("x", _prompt(8)) == 2
    assert bm.commit("x", _prompt(8)) == 2                        # idempotent
    assert bm.commit("x", _prompt(3)) == 2                        # a shorter commit changes nothing
    bm.check()


def test_incremental_commit_chains_the_hashes():
    """Committing in pieces (prompt, then decode steps) hashes as one commit of the whole."""
    bm = BlockManager(12, 2, ROOT)
    tokens = _prompt(9)
    bm.allocate("a", tokens[:3], 4)
    bm.commit("a", tokens[:3])
    for n in range(4, 10):
        bm.grow("a", n)
        bm.commit("a", tokens[:n])
    table = bm.table("a")
    assert {bm._hash_of[b] for b in table[:4]} == set(block_hashes(tokens, 2, ROOT))
    bm.release("a")
    assert bm.allocate("b", tokens, 10) == 8
    assert bm.table("b")[:4] == table[:4]
    bm.check()


def test_match_takes_no_references():
    bm = BlockManager(6, 2, ROOT)                                 # 5 blocks
    _cached(bm, "x", _prompt(6))
    assert bm.match(_prompt(6)) == 6 and bm.match(_prompt(5)) == 4 and bm.match(_prompt(1)) == 0
    assert bm.match(_prompt(6, 1)) == 0 and bm.match([]) == 0
    assert bm.cached_blocks == 3 and bm.used_blocks == 0 and bm.stats == CacheStats(queried_tokens=6)
    bm.allocate("big", None, 10)                                  # all 5: the match held nothing back
    assert bm.cached_blocks == 0 and bm.match(_prompt(6)) == 0
    bm.check()


def test_stats_count_queried_and_hit_tokens_and_evictions():
    bm = BlockManager(8, 2, ROOT)                                 # 7 blocks
    _cached(bm, "a", _prompt(5))                                  # queried 5, hit 0; 2 cached
    bm.allocate("b", _prompt(5), 6)                               # queried 5, hit 4
    bm.allocate("c", None, 4)                                     # not a lookup
    bm.allocate("d", _prompt(3), 3, max_cached=1)                 # queried 3, hit 0
    assert bm.stats == CacheStats(queried_tokens=13, hit_tokens=4, evictions=0)
    bm.release("b")
    bm.release("c")
    bm.release("d")
    bm.allocate("e", None, 12)                                    # 6 of 7: 5 free + 1 eviction
    assert bm.stats.evictions == 1
    assert bm.reset_cache() == 1 and bm.stats.evictions == 2
    bm.check()


def test_block_zero_is_never_handed_out():
    bm = BlockManager(6, 2, ROOT)
    bm.allocate("all", None, 10)
    assert sorted(bm.table("all")) == [1, 2, 3, 4, 5]
    with pytest.raises(OutOfBlocks):
        bm.allocate("more", None, 1)
    assert bm.allocate("none", None, 0) == 0 and bm.table("none") == []


def test_different_roots_never_share():
    a, b = BlockManager(6, 2, b"model-a"), BlockManager(6, 2, b"model-b")
    _cached(a, "x", _prompt(4))
    assert a.match(_prompt(4)) == 4
    assert set(block_hashes(_prompt(4), 2, b"model-a")).isdisjoint(block_hashes(_prompt(4), 2, b"model-b"))
    assert b.match(_prompt(4)) == 0


@pytest.mark.parametrize("num_blocks,block_size", [(1, 4), (0, 4), (4, 0)])
def test_too_small_a_cache_is_rejected(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks >= 2 and block_size >= 1"):
        BlockManager(num_blocks, block_size)


def test_events_say_which_hashes_became_and_stopped_being_matchable():
    """Stored when a full block is committed (parent: the chain root, then the previous hash),
    removed when evicted; a repeated commit stores nothing; the snapshot is what is stored."""
    from common.kv_hash import block_hashes
    from engine.block_manager import REMOVED, STORED
    bm = BlockManager(4, 2, root=b"r" * 16)                   # 3 blocks of 2 tokens
    tokens = [1, 2, 3, 4, 5]
    h = block_hashes(tokens, 2, b"r" * 16)
    bm.allocate("a", tokens, 5)
    bm.commit("a", tokens)
    bm.commit("a", tokens)                                     # again: nothing new to store
    assert [(e.kind, e.block_hash, e.parent, e.num_tokens) for e in bm.drain_events()] == [
        (STORED, h[0], b"r" * 16, 2), (STORED, h[1], h[0], 2)]
    assert sorted(bm.snapshot()) == sorted([(h[0], b"r" * 16), (h[1], h[0])])
    bm.release("a")
    bm.allocate("c", None, 6)                                  # needs all 3: evicts both cached
    assert [(e.kind, e.block_hash) for e in bm.drain_events()] == [(REMOVED, h[1]), (REMOVED, h[0])]
    assert bm.snapshot() == [] and bm.drain_events() == []
    bm.check()
