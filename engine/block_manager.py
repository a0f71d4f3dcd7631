"""The block manager: the one owner of an instance's KV block ids (paged blocks, prefix cache).

Who calls what. One :class:`BlockManager` per instance (``services.worker.WorkerHost`` for a
worker, ``engine.llm_engine.LLMEngine`` in process). Everything that holds blocks holds them as
an *owner* here, never as an id list of its own:

- the prefill service: :meth:`~BlockManager.allocate` the prompt (cached leading blocks are
  shared), run the uncached rest, :meth:`~BlockManager.commit` it, push, :meth:`~BlockManager.release`;
- the decode service: a reservation :meth:`~BlockManager.allocate`\\ s the prompt plus a little
  headroom (cached prefix blocks shared, so the handoff skips them), the landing commits the
  prompt, and the running sequence (same owner) grows one block at a time with
  :meth:`~BlockManager.grow` from ``engine.scheduler.DecodeScheduler``; a preempted or finished
  sequence commits what it computed and releases.

Blocks and their states. Each id (block 0 excepted: padding in block tables points at it) is

- *free*: on the free list;
- *referenced*: in the block table of one or more owners (``refcount`` > 0). A block with a
  hash is full and never written again, so several owners may share it; a block without one is
  its one owner's to write;
- *cached*: unreferenced but hashed, in an LRU; a later prompt with the same prefix takes it
  back (:meth:`allocate`), and :meth:`allocate` / :meth:`grow` evict the least recently
  released ones when the free list runs out.

Every hash that becomes matchable here, and every one that stops being (eviction), is queued as
a :class:`BlockEvent`; a publisher (``services.kv_events``) drains them off the step path with
:meth:`~BlockManager.drain_events`, and :meth:`~BlockManager.snapshot` lists every hash held, so
routers can index what each instance caches (Dynamo's KV events, in this shape).

``free + cached + referenced == total`` holds after every call (:meth:`check`). Hashes chain
(``common.kv_hash``): block ``i``'s hash covers every token up to its end, from a root naming
the model, dtype, block size and layout, so equal hashes mean equal KV. Thread-safe: one lock.
Same design as vLLM's ``KVCacheManager`` with automatic prefix caching, in fewer parts.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

from common.kv_hash import block_hashes
from engine.kv_cache import OutOfBlocks, blocks_needed


class BlockError(RuntimeError):
    """A caller broke the ownership rules (unknown owner, a second allocate, double release)."""


@dataclass
class _Table:
    """One owner's blocks, in sequence order; ``hashes[i]`` is block ``i``'s once committed."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class BlockEvent:
    """A block hash that became matchable here (``stored``) or stopped being (``removed``).
    ``parent``: the previous block's hash (the chain root for a first block); ``num_tokens``:
    tokens the block holds (the block size: only full blocks have hashes)."""

    kind: str
    block_hash: bytes
    parent: bytes
    num_tokens: int


STORED, REMOVED = "stored", "removed"
MAX_QUEUED_EVENTS = 1 << 16


@dataclass
class CacheStats:
    """Prefix-cache counters since start: tokens looked up and tokens found (``allocate``),
    blocks evicted from the LRU."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0


class BlockManager:
    """See the module docstring. ``num_blocks`` counts block 0 (never handed out);
    ``root``: the hash chain's root (``common.kv_hash.chain_root``); ``prefix_cache`` False:
    nothing is ever hashed, matched or kept after release (every block is private).
    Raises ``ValueError`` for a cache too small to hold a block."""

    def __init__(self, num_blocks: int, block_size: int, root: bytes = b"", prefix_cache: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a KV cache needs num_blocks >= 2 and block_size >= 1, got {num_blocks} "
                             f"and {block_size}")
        self.block_size = block_size
        self.total = num_blocks - 1
        self.root = root
        self.prefix_cache = prefix_cache
        self.stats = CacheStats()
        self._free = list(range(num_blocks - 1, 0, -1))     # pop() hands out low ids first
        self._refs: dict[int, int] = {}                     # referenced block -> owners holding it
        self._hash_of: dict[int, bytes] = {}                # hashed block -> its hash
        self._by_hash: dict[bytes, int] = {}                # hash -> the block holding it
        self._lru: OrderedDict[int, None] = OrderedDict()   # cached blocks, least recent first
        self._parent: dict[bytes, bytes] = {}               # matchable hash -> its parent's
        self._events: deque[BlockEvent] = deque()
        self.dropped_events = 0                             # events lost while nobody drained them
        self._tables: dict[str, _Table] = {}
        self._lock = threading.Lock()

    # ---- counts ------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Unreferenced blocks kept for their prefix (evictable)."""
        return len(self._lru)

    @property
    def available_blocks(self) -> int:
        """Blocks a new allocation may take: free + cached."""
        with self._lock:
            return len(self._free) + len(self._lru)

    @property
    def used_blocks(self) -> int:
        """Blocks some owner holds."""
        with self._lock:
            return len(self._refs)

    def owners(self) -> list[str]:
        with self._lock:
            return list(self._tables)

    def holds(self, owner: str) -> bool:
        with self._lock:
            return owner in self._tables

    def table(self, owner: str) -> list[int]:
        """``owner``'s block table (a copy). Raises :class:`BlockError` for an unknown owner."""
        with self._lock:
            return list(self._get(owner).blocks)

    def tables(self, owners: Sequence[str]) -> list[list[int]]:
        """The block tables of several owners under one lock (a decode step's batch)."""
        with self._lock:
            return [list(self._get(o).blocks) for o in owners]

    # ---- allocation --------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> int:
        """Leading tokens of ``tokens`` whose blocks are cached here (whole blocks), without
        taking them: what :meth:`allocate` would reuse (routing and metrics)."""
        with self._lock:
            return len(self._matched(tokens, len(tokens))) * self.block_size

    def allocate(self, owner: str, tokens: Sequence[int] | None, num_slots: int,
                 max_cached: int | None = None, watermark: int = 0) -> int:
        """Open ``owner``'s block table with room for ``num_slots`` token slots. When ``tokens``
        (the sequence's ids) are given and the prefix cache is on, its leading full blocks that
        are cached are shared instead of new, up to ``max_cached`` tokens (default all of
        ``tokens``). Returns the number of tokens whose KV is already there (a multiple of the
        block size). Raises :class:`OutOfBlocks` when fewer than the new blocks plus
        ``watermark`` are available (nothing is taken then), :class:`BlockError` when ``owner``
        already holds blocks."""
        need_total = blocks_needed(num_slots, self.block_size)
        limit = len(tokens) if tokens is not None else 0
        limit = min(limit, max_cached if max_cached is not None else limit, num_slots)
        with self._lock:
            if owner in self._tables:
                raise BlockError(f"owner {owner!r} already holds blocks")
            hits = self._matched(tokens, limit) if tokens is not None and self.prefix_cache else []
            new = need_total - len(hits)
            revived = sum(1 for b in hits if b in self._lru)   # cached blocks leave the LRU
            if new + watermark > len(self._free) + len(self._lru) - revived:
                raise OutOfBlocks(f"need {new} new KV blocks for {num_slots} tokens "
                                  f"({len(hits)} cached), {len(self._free) + len(self._lru) - revived} of "
                                  f"{self.total} available" + (f" above the watermark of {watermark}"
                                                               if watermark else ""))
            table = _Table()
            for b in hits:
                self._take(b)
                table.blocks.append(b)
                table.hashes.append(self._hash_of[b])
            table.blocks += [self._new_block() for _ in range(new)]
            self._tables[owner] = table
            if tokens is not None and self.prefix_cache:
                self.stats.queried_tokens += len(tokens)
                self.stats.hit_tokens += len(hits) * self.block_size
            return len(hits) * self.block_size

    def grow(self, owner: str, num_slots: int) -> int:
        """Make ``owner``'s table cover ``num_slots`` token slots (evicting cached blocks when
        the free list is empty); returns the blocks added. Raises :class:`OutOfBlocks` (nothing
        taken) or :class:`BlockError` for an unknown owner."""
        with self._lock:
            table = self._get(owner)
            new = blocks_needed(num_slots, self.block_size) - len(table.blocks)
            if new <= 0:
                return 0
            if new > len(self._free) + len(self._lru):
                raise OutOfBlocks(f"need {new} more KV blocks, {len(self._free) + len(self._lru)} of "
                                  f"{self.total} available")
            table.blocks += [self._new_block() for _ in range(new)]
            return new

    def commit(self, owner: str, tokens: Sequence[int]) -> int:
        """Record that ``owner``'s table holds the KV of ``tokens`` (from position 0): its full
        blocks get their hashes and become shareable (a block whose hash another block already
        holds stays private). Returns the number of hashed blocks of the owner. Raises
        :class:`BlockError` for an unknown owner or more tokens than the table holds."""
        with self._lock:
            table = self._get(owner)
            if len(tokens) > len(table.blocks) * self.block_size:
                raise BlockError(f"commit of {len(tokens)} tokens to {owner!r}, whose table holds "
                                 f"{len(table.blocks) * self.block_size}")
            if not self.prefix_cache:
                return 0
            done = len(table.hashes)
            new = block_hashes(tokens, self.block_size, self.root, done,
                               table.hashes[-1] if done else None)
            for i, h in enumerate(new, start=done):
                block = table.blocks[i]
                if h not in self._by_hash and block not in self._hash_of:
                    self._by_hash[h] = block
                    self._hash_of[block] = h
                    parent = table.hashes[-1] if table.hashes else self.root
                    self._parent[h] = parent
                    self._queue(BlockEvent(STORED, h, parent, self.block_size))
                table.hashes.append(h)
            return len(table.hashes)

    def release(self, owner: str) -> None:
        """Drop ``owner``'s references: blocks nobody else holds become cached (hashed) or free.
        Raises :class:`BlockError` when ``owner`` holds nothing (a second release)."""
        with self._lock:
            table = self._tables.pop(owner, None)
            if table is None:
                raise BlockError(f"owner {owner!r} holds no blocks (released twice?)")
            for b in reversed(table.blocks):          # the tail is evicted first
                self._refs[b] -= 1
                if self._refs[b]:
                    continue
                del self._refs[b]
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def drain_events(self, limit: int = 4096) -> list[BlockEvent]:
        """Up to ``limit`` queued events, oldest first (the publisher's call). At most
        ``MAX_QUEUED_EVENTS`` wait: past that the oldest are dropped and counted in
        ``dropped_events`` (a consumer then resyncs from :meth:`snapshot`)."""
        with self._lock:
            return [self._events.popleft() for _ in range(min(limit, len(self._events)))]

    def snapshot(self) -> list[tuple[bytes, bytes]]:
        """``(hash, parent hash)`` of every block matchable here now, parents before children."""
        with self._lock:
            return list(self._parent.items())

    def reset_cache(self) -> int:
        """Evict every cached (unreferenced) block; returns how many (tests, benches)."""
        with self._lock:
            n = len(self._lru)
            while self._lru:
                self._evict()
            return n

    def check(self) -> None:
        """Assert the invariants (tests): the counts add up, every referenced block's count is
        the number of tables holding it, no block is in two states, hashes map both ways."""
        with self._lock:
            held: dict[int, int] = {}
            for table in self._tables.values():
                for b in table.blocks:
                    held[b] = held.get(b, 0) + 1
            assert held == self._refs, "reference counts disagree with the block tables"
            free, lru, refs = set(self._free), set(self._lru), set(self._refs)
            assert len(free) == len(self._free), "a block is on the free list twice"
            assert not (free & lru or free & refs or lru & refs), "a block is in two states"
            assert len(free) + len(lru) + len(refs) == self.total, "free + cached + referenced != total"
            assert lru <= set(self._hash_of), "a cached block has no hash"
            assert all(self._by_hash[h] == b for b, h in self._hash_of.items()), "hash maps disagree"
            assert not free & set(self._hash_of), "a free block still has a hash"
            assert set(self._parent) == set(self._by_hash), "parents and hashes disagree"

    # ---- internals (lock held) -----------------------------------------------------------------
    def _get(self, owner: str) -> _Table:
        table = self._tables.get(owner)
        if table is None:
            raise BlockError(f"owner {owner!r} holds no blocks")
        return table

    def _matched(self, tokens: Sequence[int] | None, limit: int) -> list[int]:
        """The cached blocks holding the leading full blocks of ``tokens[:limit]``."""
        if not tokens or not self._by_hash:
            return []
        out = []
        for h in block_hashes(tokens[:limit], self.block_size, self.root):
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def _take(self, block: int) -> None:
        """One more reference to ``block`` (out of the LRU when it was cached)."""
        self._lru.pop(block, None)
        self._refs[block] = self._refs.get(block, 0) + 1

    def _new_block(self) -> int:
        """A private block: from the free list, else the least recently used cached block."""
        if not self._free:
            self._evict()
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _evict(self) -> None:
        block, _ = self._lru.popitem(last=False)
        h = self._hash_of.pop(block)
        del self._by_hash[h]
        self._queue(BlockEvent(REMOVED, h, self._parent.pop(h), self.block_size))
        self._free.append(block)
        self.stats.evictions += 1

    def _queue(self, event: BlockEvent) -> None:
        if len(self._events) >= MAX_QUEUED_EVENTS:
            self._events.popleft()
            self.dropped_events += 1
        self._events.append(event)
