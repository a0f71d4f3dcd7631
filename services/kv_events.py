"""KV events in Redis: what each worker instance's prefix cache holds, for KV-aware routers.

One :class:`KvEventPublisher` per worker instance (both pools), an asyncio task beside the
registry heartbeat (``services.worker.start_worker``; ``--kv-events``, on by default, needs
``--redis-url``). It drains the block manager's stored / removed events
(``engine.block_manager.BlockManager.drain_events``: a short lock, from its own task, never a
model step's) every ``batch_s`` and publishes them; no Redis call is made with that lock held,
and every Redis call is bounded by ``timeout_s``, so a slow or absent Redis never delays a step.

Wire format (the routers' index reads exactly this; ``<prefix>`` is ``--key-prefix``, e.g.
``cleave:``):

- Stream ``<prefix>kv-events:<pool>``, one per pool, capped (``XADD ... MAXLEN ~ 200000``). One
  entry per publish; its fields (byte strings):

  ======  ====================================================================================
  ``w``   worker id
  ``i``   incarnation (a new one each time the worker process starts)
  ``s``   sequence number, decimal: 1 for an incarnation's first entry, +1 per entry (heartbeat
          entries too). A number skipped is a gap: events were lost (Redis was down longer than
          the pending list lasts); resync that worker from its snapshot. After a Redis timeout
          an entry may be written twice (same ``s``, same content): skip ``s`` <= the last
          applied.
  ``bs``  block size in tokens, decimal (the tokens of every block named here)
  ``r``   the hash chain's root (``common.kv_hash.chain_root``), 32 hex digits: a first
          block's parent
  ``st``  blocks stored (now matchable here): 32-byte records ``hash(16) + parent(16)``, in
          event order (may be empty)
  ``rm``  blocks removed (evicted): 16-byte hashes, in event order (may be empty)
  ======  ====================================================================================

  A consumer applies an entry's ``st`` then its ``rm``; entries are cut so that this never
  reorders events on one hash (a hash removed in an entry is never stored again in it).
  Entries come every ``batch_s`` (50 ms) while there are events, and an entry with neither
  (a heartbeat) after ``heartbeat_s`` (1 s) without one, so "alive, nothing changed" differs
  from "events stopped".
- Hash ``<prefix>kv-snapshot:<pool>:<worker_id>``: ``i``, ``s`` (the sequence number of the
  last entry published before the snapshot was taken: apply entries after it), ``bs``, ``r``,
  ``t`` (unix time), ``blocks`` (``hash(16) + parent(16)`` of every block matchable then,
  parents before children). Written when the publisher starts (``s`` = 0, before the first
  entry), every ``--kv-snapshot-interval`` seconds and after a gap, only when every drained
  event has been published; expires after 3 intervals + 10 s; deleted on a clean stop.

Redis slow or down: drained events wait in a bounded pending list (``max_pending``, 100k);
past it the oldest are dropped and a sequence number is skipped, so consumers see the gap and
resync from the next snapshot (events the block manager itself dropped, its queue full, count
the same way). One warning per outage. Counters: ``cleave_kv_events_published_total`` and
``cleave_kv_events_dropped_total`` on the worker's metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from engine.block_manager import REMOVED, STORED, BlockEvent, BlockManager

log = logging.getLogger(__name__)

STREAM_MAXLEN = 200_000     # entries kept per pool stream (approximate trimming)
MAX_PENDING = 100_000       # drained events held while Redis is slow or down
ENTRY_EVENTS = 4096         # events per stream entry at most
ROUND_EVENTS = 16_384       # events cut into entries per Redis round trip at most
HASH_BYTES = 16


def stream_key(prefix: str, pool: str) -> str:
    return f"{prefix}kv-events:{pool}"


def snapshot_key(prefix: str, pool: str, worker_id: str) -> str:
    return f"{prefix}kv-snapshot:{pool}:{worker_id}"


_GAP = object()   # in the pending list: events lost here; the next entry skips a sequence number


def cut_entries(events: Iterable[BlockEvent], max_events: int = ENTRY_EVENTS,
                ) -> list[tuple[list[tuple[bytes, bytes]], list[bytes]]]:
    """``events`` as ``(stored (hash, parent) pairs, removed hashes)`` per entry, in order, such
    that applying each entry's stored then its removed gives the state applying the events one
    by one does: an entry ends before a store of a hash it removes, and at ``max_events``."""
    out: list[tuple[list[tuple[bytes, bytes]], list[bytes]]] = []
    stored: list[tuple[bytes, bytes]] = []
    removed: list[bytes] = []
    gone: set[bytes] = set()
    for e in events:
        if len(stored) + len(removed) >= max_events or (e.kind == STORED and e.block_hash in gone):
            out.append((stored, removed))
            stored, removed, gone = [], [], set()
        if e.kind == STORED:
            stored.append((e.block_hash, e.parent))
        elif e.kind == REMOVED:
            removed.append(e.block_hash)
            gone.add(e.block_hash)
    if stored or removed:
        out.append((stored, removed))
    return out


@dataclass(frozen=True)
class KvEntry:
    """One stream entry, decoded (:func:`decode_entry`)."""

    worker_id: str
    incarnation: str
    seq: int
    block_size: int
    root: bytes
    stored: list[tuple[bytes, bytes]]
    removed: list[bytes]


@dataclass(frozen=True)
class KvSnapshot:
    """One worker's snapshot hash, decoded (:func:`decode_snapshot`)."""

    incarnation: str
    seq: int
    block_size: int
    root: bytes
    time: float
    blocks: list[tuple[bytes, bytes]]


def _field(fields: dict, name: str) -> bytes:
    value = fields.get(name.encode(), fields.get(name, b""))
    return value.encode() if isinstance(value, str) else value


def _pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    if len(data) % (2 * HASH_BYTES):
        raise ValueError(f"{len(data)} bytes of (hash, parent) records is not a multiple of {2 * HASH_BYTES}")
    step = 2 * HASH_BYTES
    return [(data[k:k + HASH_BYTES], data[k + HASH_BYTES:k + step]) for k in range(0, len(data), step)]


def decode_entry(fields: dict) -> KvEntry:
    """A stream entry's fields (bytes or str keys; values read without decoding) as a
    :class:`KvEntry`. Raises ``ValueError`` for malformed records."""
    rm = _field(fields, "rm")
    if len(rm) % HASH_BYTES:
        raise ValueError(f"{len(rm)} bytes of removed hashes is not a multiple of {HASH_BYTES}")
    return KvEntry(worker_id=_field(fields, "w").decode(), incarnation=_field(fields, "i").decode(),
                   seq=int(_field(fields, "s")), block_size=int(_field(fields, "bs")),
                   root=bytes.fromhex(_field(fields, "r").decode()), stored=_pairs(_field(fields, "st")),
                   removed=[rm[k:k + HASH_BYTES] for k in range(0, len(rm), HASH_BYTES)])


def decode_snapshot(fields: dict) -> KvSnapshot:
    """A snapshot hash (as ``HGETALL`` returns it without decoding) as a :class:`KvSnapshot`."""
    return KvSnapshot(incarnation=_field(fields, "i").decode(), seq=int(_field(fields, "s")),
                      block_size=int(_field(fields, "bs")), root=bytes.fromhex(_field(fields, "r").decode()),
                      time=float(_field(fields, "t")), blocks=_pairs(_field(fields, "blocks")))


class KvEventPublisher:
    """Publishes one instance's block events and snapshots (see the module docstring).

    ``client``: an asyncio Redis client (responses decoded or not: only writes are made);
    ``metrics``: anything with ``kv_events(published, dropped)`` (``common.prom.WorkerMetrics``).
    :meth:`start` writes the first snapshot, :meth:`run` publishes until cancelled,
    :meth:`close` flushes what is left and deletes the snapshot. :meth:`tick` is one round
    (tests drive it directly); none of them raises for Redis errors."""

    def __init__(self, client, prefix: str, pool: str, worker_id: str, incarnation: str,
                 blocks: BlockManager, metrics=None, *, batch_s: float = 0.05, heartbeat_s: float = 1.0,
                 snapshot_s: float = 5.0, timeout_s: float = 2.0, max_pending: int = MAX_PENDING,
                 maxlen: int = STREAM_MAXLEN, clock: Callable[[], float] = time.monotonic) -> None:
        if not (batch_s > 0 and heartbeat_s > 0 and snapshot_s > 0 and timeout_s > 0 and max_pending >= 1):
            raise ValueError("KvEventPublisher needs positive intervals and timeout and max_pending >= 1")
        self._client = client
        self.stream = stream_key(prefix, pool)
        self.snapshot_key = snapshot_key(prefix, pool, worker_id)
        self.worker_id, self.incarnation, self.blocks = worker_id, incarnation, blocks
        self._metrics = metrics
        self.batch_s, self.heartbeat_s, self.snapshot_s, self.timeout_s = batch_s, heartbeat_s, snapshot_s, timeout_s
        self.max_pending, self.maxlen = max_pending, maxlen
        self._clock = clock
        self._head = {b"w": worker_id.encode(), b"i": incarnation.encode(),
                      b"bs": str(blocks.block_size).encode(), b"r": blocks.root.hex().encode()}
        self.seq = 0                             # the last sequence number assigned (never reused)
        self._pending: deque = deque()           # drained BlockEvents (and _GAP marks), oldest first
        self._pending_events = 0                 # BlockEvents in _pending
        self._inflight: list[tuple[int, dict, int]] = []   # (seq, fields, events): sent verbatim until acked
        self._bm_dropped = blocks.dropped_events
        self._last_entry = clock()
        self._last_snapshot: float | None = None  # None: a snapshot is due at once
        self._down_since: float | None = None     # set while Redis fails
        self._dropped_in_outage = 0
        self.published_events = 0
        self.dropped_events = 0
        self.entries = 0                         # stream entries acknowledged
        self.snapshots = 0                       # snapshots written

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Write the first snapshot (``s`` = 0) before any entry; on failure the next round retries."""
        await self._snapshot()

    async def run(self) -> None:
        """Publish every ``batch_s`` until cancelled."""
        failing = False
        while True:
            try:
                await self.tick()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug here must not end publishing for the worker's lifetime
                if not failing:
                    log.exception("KV event publisher round failed")
                failing = True
            await asyncio.sleep(self.batch_s)

    async def close(self, delete_snapshot: bool = True) -> None:
        """A last round (what is drained gets published) and, on a clean stop, the snapshot
        deleted; bounded by a few ``timeout_s``, never raises for Redis errors."""
        with contextlib.suppress(Exception):
            await self.tick(snapshot=False)
        if delete_snapshot:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.delete(self.snapshot_key), self.timeout_s)

    # ---- one round ---------------------------------------------------------------------------
    async def tick(self, snapshot: bool = True) -> None:
        """Drain the block manager, publish (entries held from a failed round first, verbatim),
        a heartbeat entry when none went out for ``heartbeat_s``, and the snapshot when due and
        every drained event is out."""
        self._collect()
        for _ in range(1 + MAX_PENDING // ROUND_EVENTS):   # a backlog goes out in a few round trips
            if not self._inflight:
                self._cut()
            if not self._inflight or not await self._send():
                break
            if not self._pending:
                break
        if not self._inflight and not self._pending and self._clock() - self._last_entry >= self.heartbeat_s:
            self._assign([])
            await self._send()
        if snapshot and not self._inflight and not self._pending and (
                self._last_snapshot is None or self._clock() - self._last_snapshot >= self.snapshot_s):
            await self._snapshot()

    # ---- internals ---------------------------------------------------------------------------
    def _collect(self) -> None:
        """Move the block manager's queued events into the pending list (its lock held only
        while it hands them over), dropping the oldest past ``max_pending``."""
        drained: list[BlockEvent] = []
        while True:
            batch = self.blocks.drain_events(ENTRY_EVENTS)
            drained += batch
            if len(batch) < ENTRY_EVENTS:
                break
        lost = self.blocks.dropped_events - self._bm_dropped
        if lost:
            # lost in the block manager's queue: after what is pending, before what was just drained
            self._bm_dropped += lost
            self._pending.append(_GAP)
            self._dropped(lost)
        self._pending.extend(drained)
        self._pending_events += len(drained)
        over = self._pending_events - self.max_pending
        if over > 0:
            n = 0
            while n < over:
                if self._pending.popleft() is not _GAP:
                    n += 1
            self._pending_events -= over
            self._pending.appendleft(_GAP)
            self._dropped(over)

    def _dropped(self, n: int) -> None:
        self.dropped_events += n
        self._dropped_in_outage += n
        if self._metrics is not None:
            self._metrics.kv_events(0, n)

    def _cut(self) -> None:
        """Turn up to ``ROUND_EVENTS`` pending events into numbered entries (``_inflight``)."""
        events: list[BlockEvent] = []
        while self._pending and len(events) < ROUND_EVENTS:
            item = self._pending.popleft()
            if item is _GAP:
                for stored, removed in cut_entries(events):
                    self._assign(stored, removed)
                events = []
                self.seq += 1                  # skipped: consumers see the gap
                self._last_snapshot = None     # and find a fresh snapshot once all is out
                continue
            events.append(item)
            self._pending_events -= 1
        for stored, removed in cut_entries(events):
            self._assign(stored, removed)

    def _assign(self, stored: list[tuple[bytes, bytes]], removed: list[bytes] = ()) -> None:
        self.seq += 1
        fields = {**self._head, b"s": str(self.seq).encode(),
                  b"st": b"".join(h + p for h, p in stored), b"rm": b"".join(removed)}
        self._inflight.append((self.seq, fields, len(stored) + len(removed)))

    async def _send(self) -> bool:
        """XADD every held entry in one round trip; True when Redis took them all."""
        async def xadd_all():
            async with self._client.pipeline(transaction=False) as pipe:
                for _, fields, _ in self._inflight:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                await pipe.execute()
        if not await self._call(xadd_all, "publish KV events"):
            return False
        n = sum(e for _, _, e in self._inflight)
        self.entries += len(self._inflight)
        self.published_events += n
        self._inflight = []
        self._last_entry = self._clock()
        if self._metrics is not None and n:
            self._metrics.kv_events(n, 0)
        return True

    async def _snapshot(self) -> bool:
        """Write the snapshot hash (every drained event is published: ``s`` names the last)."""
        seq = self.seq
        held = self.blocks.snapshot()
        if len(held) > 20_000:   # a big cache: build the value off the event loop
            blocks = await asyncio.to_thread(lambda: b"".join(h + p for h, p in held))
        else:
            blocks = b"".join(h + p for h, p in held)
        mapping = {b"i": self._head[b"i"], b"s": str(seq).encode(), b"bs": self._head[b"bs"],
                   b"r": self._head[b"r"], b"t": f"{time.time():.3f}".encode(), b"blocks": blocks}
        ttl_ms = int((3 * self.snapshot_s + 10) * 1000)

        async def write():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self.snapshot_key, mapping=mapping)
                pipe.pexpire(self.snapshot_key, ttl_ms)
                await pipe.execute()
        if not await self._call(write, "write the KV snapshot"):
            return False
        self._last_snapshot = self._clock()
        self.snapshots += 1
        return True

    async def _call(self, fn, what: str) -> bool:
        """Run a Redis call under ``timeout_s``; log once per outage, and once when it ends."""
        try:
            await asyncio.wait_for(fn(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._down_since is None:
                self._down_since = self._clock()
                self._dropped_in_outage = 0
                log.warning("KV events of %s: could not %s in Redis (%s); holding up to %d events and "
                            "retrying every %.2f s", self.worker_id, what, str(exc) or type(exc).__name__,
                            self.max_pending, self.batch_s)
            return False
        if self._down_since is not None:
            log.warning("KV events of %s: Redis reachable again after %.1f s; %d events dropped meanwhile%s",
                        self.worker_id, self._clock() - self._down_since, self._dropped_in_outage,
                        " (routers resync from the next snapshot)" if self._dropped_in_outage else "")
            self._down_since = None
        return True
