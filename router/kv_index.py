"""The router's KV index: which blocks each worker instance caches, fed by the workers' KV
events in Redis (issue 22), so routing can send a prompt where its prefix is cached.

Wire format (written by each worker's publisher, read here):

* Stream ``{prefix}kv-events:{pool}`` (capped). Entry fields: ``w`` worker id, ``i``
  incarnation, ``s`` per-worker sequence number (1 for an incarnation's first entry, +1 per
  entry), ``bs`` block size, ``r`` chain root (32 hex characters), ``st`` stored blocks
  (concatenated 32-byte ``hash + parent`` records), ``rm`` removed blocks (concatenated 16-byte
  hashes). ``st`` applies before ``rm``. An entry with neither is a heartbeat (each worker sends
  one a second).
* Hash ``{prefix}kv-snapshot:{pool}:{worker_id}``: ``i``, ``s`` (the last entry published
  before it was taken), ``bs``, ``r``, ``t`` (unix time), ``blocks`` (``hash + parent`` of every
  matchable block), refreshed every few seconds. Applying the entries after ``s`` on top of it
  gives the worker's set (stored adds, removed deletes; idempotent).

:class:`KvIndex` keeps, per worker, the set of block hashes it holds. One background task per
pool catches up (snapshots, then the stream from a little before the oldest snapshot, or all of
it when there is none) on start and after every Redis error, then follows the stream with a blocking ``XREAD``. Entries apply in
sequence per worker; one at or below what is applied is skipped; a gap (an entry past the next
expected one: trimmed away, lost in a reconnect) puts that worker in *resyncing*: later entries
are buffered and its snapshot is polled (at once, then every ``resync_poll_s``) until one covers
the gap, which is applied with the buffered entries on top. A new incarnation of a worker
replaces its entries (in the stream, or registered by the directory: :meth:`KvIndex.sync_workers`);
a worker missing from the registry is dropped after ``grace_s`` (a registry gap of a second or two
is no departure).

Mode per pool (:meth:`KvIndex.mode`; gauge ``cleave_kv_index_mode``, ``GetModelInfo``,
``cleave info``; each change logged once, WARNING when it leaves ``exact``):

* ``exact``: every live (registered) worker of the pool is synced and was heard from (any
  entry, heartbeats too) within ``silence_s``;
* ``resyncing``: some live worker is catching up (a gap, or no baseline yet);
* ``approximate``: some live worker has been silent past ``silence_s``, or the stream cannot be
  read. Answers for the workers not known exactly then also use this router's own routing
  history (:meth:`KvIndex.note_routed`, entries kept ``history_ttl_s``), on top of what their
  events last said.

Queries (:meth:`KvIndex.cached_tokens`, :meth:`KvIndex.match`) are pure and synchronous: no
Redis call on the request path. A :class:`PromptHashes` carries one prompt's hash chains,
computed lazily per (root, block size), so ranking N workers hashes the prompt once per
distinct root. Memory is bounded: a worker's set is what its snapshot and events say, buffered
entries and history are capped, history expires, departed workers are dropped.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import redis.asyncio as aioredis

from common.kv_hash import DIGEST_BYTES, block_hash, block_hashes

log = logging.getLogger(__name__)

EXACT, RESYNCING, APPROXIMATE = "exact", "resyncing", "approximate"
MODES = (EXACT, RESYNCING, APPROXIMATE)
POOLS = ("prefill", "decode")
_RECORD = 2 * DIGEST_BYTES            # one stored block: hash + parent


def stream_key(prefix: str, pool: str) -> str:
    return f"{prefix}kv-events:{pool}"


def snapshot_key(prefix: str, pool: str, worker_id: str) -> str:
    return f"{prefix}kv-snapshot:{pool}:{worker_id}"


def hashes_for(prompt: Sequence[int], root: bytes, block_size: int) -> list[bytes]:
    """The hashes of ``prompt``'s full blocks on an instance with chain ``root`` and ``block_size``."""
    return block_hashes(prompt, block_size, root)


class PromptHashes:
    """One prompt's block-hash chains, computed lazily (only as far as a lookup walks) and kept
    per (root, block size): make one per request and pass it to every lookup and to
    :meth:`KvIndex.note_routed`."""

    def __init__(self, prompt: Sequence[int]) -> None:
        self.prompt = prompt
        self._chains: dict[tuple[bytes, int], list[bytes]] = {}

    def upto(self, root: bytes, block_size: int, n: int) -> list[bytes]:
        """The chain for (``root``, ``block_size``) with at least its first ``n`` hashes (fewer
        when the prompt has fewer full blocks)."""
        chain = self._chains.setdefault((root, block_size), [])
        n = min(n, len(self.prompt) // block_size)
        p = self.prompt
        while len(chain) < n:
            b = len(chain)
            chain.append(block_hash(chain[-1] if chain else root, p[b * block_size:(b + 1) * block_size]))
        return chain

    def all(self, root: bytes, block_size: int) -> list[bytes]:
        return self.upto(root, block_size, len(self.prompt) // block_size)

    def prefix_blocks(self, root: bytes, block_size: int, held: Callable[[bytes], bool]) -> int:
        """How many leading full blocks ``held`` says are there (hashing stops at the first miss)."""
        if block_size < 1:
            return 0
        full = len(self.prompt) // block_size
        chain = self._chains.get((root, block_size), [])
        i = 0
        while i < full:
            if i >= len(chain):
                chain = self.upto(root, block_size, min(full, i + 8))
            if not held(chain[i]):
                break
            i += 1
        return i


@dataclass
class _Worker:
    pool: str
    worker_id: str
    incarnation: str = ""
    root: bytes = b""
    block_size: int = 0
    blocks: set[bytes] = field(default_factory=set)
    seq: int = 0                  # last entry applied (or the snapshot's)
    synced: bool = False          # has a baseline: a snapshot, or its incarnation's first entry
    resyncing: bool = False       # a gap: waiting for a snapshot covering ``need``
    need: int = 0                 # highest sequence number it lacks (a snapshot must cover it)
    pending: deque = field(default_factory=deque)   # (seq, st, rm) buffered while resyncing
    heard: float = 0.0            # monotonic time of its last entry (or when it was first seen)
    absent_since: float | None = None   # monotonic: missing from the registry since
    next_poll: float = 0.0        # monotonic: next snapshot read while resyncing
    dead: deque = field(default_factory=lambda: deque(maxlen=8))   # incarnations it replaced


@dataclass
class _History:
    incarnation: str
    root: bytes
    block_size: int
    expiry: OrderedDict = field(default_factory=OrderedDict)   # hash -> monotonic expiry, oldest first


def _id_key(stream_id) -> tuple[int, int]:
    text = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _streams(resp) -> Iterable[tuple[object, list]]:
    """(key, entries) pairs of an XREAD answer (RESP2 list or RESP3 map)."""
    if not resp:
        return ()
    return resp.items() if isinstance(resp, dict) else resp


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _binary_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client on the same server as ``client`` that returns bytes (block hashes are binary)."""
    pool = client.connection_pool
    kw = {k: v for k, v in pool.connection_kwargs.items()
          if k not in ("maint_notifications_pool_handler", "himport_registry") and not k.startswith("orig_")}
    kw["decode_responses"] = False
    return aioredis.Redis.from_pool(aioredis.ConnectionPool(connection_class=pool.connection_class,
                                                            max_connections=pool.max_connections, **kw))


class KvIndex:
    """The prefix index of one router (see the module docstring).

    ``client``: the router's Redis client (a byte-returning client on the same server is made
    from it); ``prefix``: the deployment's key prefix. Timing (seconds unless named): ``grace_s``
    an unregistered worker is kept; ``silence_s`` a worker may go without an entry and stay
    exact; ``history_ttl_s`` a routed prompt's blocks are predicted; ``resync_poll_s`` between
    snapshot reads of a resyncing worker; ``block_ms`` of one blocking read; ``tick_s`` between
    mode checks and history sweeps; ``backoff_s`` (first, longest) wait before reconnecting;
    ``catchup_slack_s`` read before the oldest snapshot's time on catch-up (clock skew).
    """

    def __init__(self, client: aioredis.Redis, prefix: str, pools: Sequence[str] = POOLS, *,
                 grace_s: float = 30.0, silence_s: float = 3.0, history_ttl_s: float = 120.0,
                 resync_poll_s: float = 1.0, block_ms: int = 500, tick_s: float = 0.25,
                 backoff_s: tuple[float, float] = (0.1, 5.0), read_count: int = 1000,
                 max_pending: int = 10_000, history_max_blocks: int = 200_000,
                 catchup_slack_s: float = 2.0, warn_interval_s: float = 10.0) -> None:
        self._client = client
        self._r: aioredis.Redis | None = None
        self.prefix = prefix
        self.pools = tuple(pools)
        self.grace_s, self.silence_s, self.history_ttl_s = grace_s, silence_s, history_ttl_s
        self.resync_poll_s, self.block_ms, self.tick_s = resync_poll_s, block_ms, tick_s
        self.backoff_s, self.read_count, self.max_pending = backoff_s, read_count, max_pending
        self.history_max_blocks, self.catchup_slack_s = history_max_blocks, catchup_slack_s
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._history: dict[tuple[str, str], _History] = {}
        self._stream_ok = {p: False for p in self.pools}
        self._attempted = {p: False for p in self.pools}   # first catch-up tried (mode known)
        self._modes: dict[str, str] = {}
        self._registered: dict[str, dict[str, str]] = {}   # pool -> {worker_id: incarnation} (last sync)
        self._tasks: list[asyncio.Task] = []
        self._stopping = False          # set by stop(): the follow and tick loops end
        self._warned: dict[str, tuple[float, int]] = {}
        self._warn_interval_s = warn_interval_s

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start following each pool's stream (returns at once; catch-up runs in the tasks)."""
        if self._r is None:
            self._r = _binary_client(self._client)
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._tasks = [loop.create_task(self._follow(p), name=f"kv-index-{p}") for p in self.pools]
        self._tasks.append(loop.create_task(self._tick(), name="kv-index-tick"))

    async def stop(self) -> None:
        """Stop the tasks and close the index's Redis client. A cancel can be lost inside
        redis-py (its socket-timeout context turns a cancel that races a timeout into a
        TimeoutError, which its retry absorbs), so the loops also check ``_stopping``, and a task
        still running is cancelled again every half second, for up to 5 s (then it is left,
        with a warning)."""
        self._stopping = True
        pending, deadline = set(self._tasks), time.monotonic() + 5.0
        try:
            while pending and time.monotonic() < deadline:
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.5)
            if pending:
                log.warning("kv index: %s did not stop", ", ".join(t.get_name() for t in pending))
        finally:
            self._tasks = []
            if self._r is not None:
                r, self._r = self._r, None
                try:
                    await r.aclose()
                except Exception:  # closing a client of a Redis that is gone
                    pass

    # ---- queries (pure, synchronous) -----------------------------------------------------------------
    def cached_tokens(self, pool: str, worker_id: str, prompt: Sequence[int],
                      hashes: PromptHashes | None = None, now: float | None = None) -> int:
        """Tokens of ``prompt`` (whole blocks, from its start) the index says ``worker_id`` holds.
        Pass one ``hashes`` for every worker a request ranks."""
        hashes = hashes if hashes is not None else PromptHashes(prompt)
        now = time.monotonic() if now is None else now
        key = (pool, worker_id)
        w = self._workers.get(key)
        index = w if w is not None and w.block_size > 0 and w.root else None
        if w is not None and index is not None and self._trusted(w, now):
            return hashes.prefix_blocks(w.root, w.block_size, w.blocks.__contains__) * w.block_size
        h = self._history.get(key)
        if h is not None and w is not None and w.incarnation and h.incarnation != w.incarnation:
            h = None                      # routed to an incarnation that is gone
        if h is None:
            return 0 if index is None else \
                hashes.prefix_blocks(index.root, index.block_size, index.blocks.__contains__) * index.block_size
        expiry = h.expiry

        def predicted(x: bytes) -> bool:
            return expiry.get(x, 0.0) > now

        if index is not None and (index.root, index.block_size) == (h.root, h.block_size):
            blocks = index.blocks
            return hashes.prefix_blocks(h.root, h.block_size, lambda x: x in blocks or predicted(x)) * h.block_size
        best = hashes.prefix_blocks(h.root, h.block_size, predicted) * h.block_size
        if index is not None:
            best = max(best, hashes.prefix_blocks(index.root, index.block_size,
                                                  index.blocks.__contains__) * index.block_size)
        return best

    def match(self, pool: str, prompt: Sequence[int], worker_ids: Iterable[str] | None = None,
              hashes: PromptHashes | None = None) -> dict[str, int]:
        """:meth:`cached_tokens` for each of ``worker_ids`` (default: every worker indexed in
        ``pool``), hashing the prompt once per distinct root."""
        hashes = hashes if hashes is not None else PromptHashes(prompt)
        now = time.monotonic()
        if worker_ids is None:
            worker_ids = {w.worker_id for w in self._in_pool(pool)} | {k[1] for k in self._history if k[0] == pool}
        return {wid: self.cached_tokens(pool, wid, prompt, hashes, now) for wid in worker_ids}

    def root_of(self, pool: str, worker_id: str) -> tuple[bytes, int] | None:
        """(chain root, block size) the worker's events name, or None before any."""
        w = self._workers.get((pool, worker_id))
        return (w.root, w.block_size) if w is not None and w.root and w.block_size else None

    def note_routed(self, pool: str, worker_id: str, incarnation: str, root: bytes | str, block_size: int,
                    prompt: Sequence[int], hashes: PromptHashes | None = None, now: float | None = None) -> None:
        """Remember that ``prompt`` was sent to ``worker_id`` (incarnation ``incarnation``, chain
        ``root`` as bytes or hex, ``block_size``): its full blocks are predicted there for
        ``history_ttl_s`` while the worker is not known exactly."""
        if block_size < 1:
            return
        try:
            root = bytes.fromhex(root) if isinstance(root, str) else bytes(root)
        except ValueError:
            return
        now = time.monotonic() if now is None else now
        key = (pool, worker_id)
        h = self._history.get(key)
        if h is None or (h.incarnation, h.root, h.block_size) != (incarnation, root, block_size):
            h = self._history[key] = _History(incarnation, root, block_size)
        chain = (hashes if hashes is not None else PromptHashes(prompt)).all(root, block_size)
        expires, od = now + self.history_ttl_s, h.expiry
        for x in chain:
            if x in od:
                od.move_to_end(x)
            od[x] = expires
        while len(od) > self.history_max_blocks:
            od.popitem(last=False)

    def mode(self, pool: str) -> str:
        """The pool's mode now (``resyncing`` until its first catch-up was tried)."""
        return self._modes.get(pool, RESYNCING)

    def modes(self) -> dict[str, str]:
        return {p: self.mode(p) for p in self.pools}

    def blocks(self, pool: str) -> int:
        """Block hashes indexed from events for the pool's workers (summed over workers)."""
        return sum(len(w.blocks) for w in self._in_pool(pool))

    def block_counts(self) -> dict[str, int]:
        return {p: self.blocks(p) for p in self.pools}

    def describe(self, pool: str) -> dict[str, dict]:
        """Per worker: incarnation, seq, synced, resyncing, blocks, seconds since heard, absent."""
        now = time.monotonic()
        return {w.worker_id: dict(incarnation=w.incarnation, seq=w.seq, synced=w.synced, resyncing=w.resyncing,
                                  blocks=len(w.blocks), silent_s=now - w.heard,
                                  absent_s=None if w.absent_since is None else now - w.absent_since)
                for w in self._in_pool(pool)}

    # ---- the registry (called by the worker directory's refresh) -----------------------------------
    def sync_registry(self, records: Iterable) -> None:
        """:meth:`sync_workers` for every pool from registry records (``pool``, ``worker_id``,
        ``incarnation``): a pool without records has no workers."""
        by_pool: dict[str, dict[str, str]] = {p: {} for p in self.pools}
        for r in records:
            if r.pool in by_pool:
                by_pool[r.pool][r.worker_id] = r.incarnation
        now = time.monotonic()
        for pool, workers in by_pool.items():
            self.sync_workers(pool, workers, now)

    def sync_workers(self, pool: str, registered: Mapping[str, str], now: float | None = None) -> None:
        """The pool's registered workers now, ``{worker_id: incarnation}``. A worker registered
        with another incarnation than its entries name loses them at once; one missing is kept
        ``grace_s``, then dropped with its history."""
        now = time.monotonic() if now is None else now
        self._registered[pool] = dict(registered)
        for wid, inc in registered.items():
            w = self._workers.get((pool, wid))
            if w is None:
                self._workers[(pool, wid)] = _Worker(pool, wid, incarnation=inc, heard=now)
                continue
            w.absent_since = None
            if inc != w.incarnation and inc not in w.dead:
                # the registry names an incarnation its events have not: the one indexed is gone
                # (not marked dead: if the registry lagged instead, the stream's next entry wins)
                if w.incarnation:
                    log.info("kv index: %s/%s is registered as a new incarnation; its %d indexed blocks "
                             "are dropped", pool, wid, len(w.blocks))
                self._reset(w, inc, retire=False)
                w.heard = now
        for w in self._in_pool(pool):
            if w.worker_id in registered:
                continue
            if w.absent_since is None:
                w.absent_since = now
            elif now - w.absent_since >= self.grace_s:
                self._drop(w, f"absent from the registry for {self.grace_s:.0f} s")

    # ---- internals: applying ---------------------------------------------------------------------
    def _in_pool(self, pool: str) -> list[_Worker]:
        return [w for (p, _), w in self._workers.items() if p == pool]

    def _new(self, pool: str, wid: str, incarnation: str, now: float) -> _Worker:
        """Track a worker first seen in the stream or a snapshot (absent at once when the registry,
        read already, does not list it: a stale publisher does not hold the pool's mode)."""
        w = self._workers[(pool, wid)] = _Worker(pool, wid, incarnation=incarnation, heard=now)
        registered = self._registered.get(pool)
        if registered is not None and wid not in registered:
            w.absent_since = now
        return w

    def _trusted(self, w: _Worker, now: float) -> bool:
        return (w.synced and not w.resyncing and now - w.heard <= self.silence_s
                and self._stream_ok.get(w.pool, False))

    def _reset(self, w: _Worker, incarnation: str, retire: bool = True) -> None:
        """``w`` becomes a fresh ``incarnation``: nothing indexed, no baseline."""
        if retire and w.incarnation:
            w.dead.append(w.incarnation)
        w.incarnation = incarnation
        w.blocks = set()
        w.seq, w.need, w.synced, w.resyncing, w.next_poll = 0, 0, False, False, 0.0
        w.pending.clear()
        h = self._history.get((w.pool, w.worker_id))
        if h is not None and h.incarnation != incarnation:
            del self._history[(w.pool, w.worker_id)]

    def _drop(self, w: _Worker, why: str) -> None:
        self._workers.pop((w.pool, w.worker_id), None)
        self._history.pop((w.pool, w.worker_id), None)
        log.info("kv index: dropped %s/%s (%d blocks): %s", w.pool, w.worker_id, len(w.blocks), why)

    def _on_entry(self, pool: str, fields: Mapping[bytes, bytes], now: float) -> None:
        wid = _text(fields[b"w"])
        inc = _text(fields[b"i"])
        seq = int(fields[b"s"])
        w = self._workers.get((pool, wid))
        if w is None:
            w = self._new(pool, wid, inc, now)
        if inc != w.incarnation:
            if inc in w.dead:
                return                     # a replaced incarnation's late entry
            if w.incarnation:
                log.info("kv index: %s/%s restarted (incarnation %s); its %d indexed blocks are dropped",
                         pool, wid, inc[:12], len(w.blocks))
            self._reset(w, inc)
        w.heard = now
        if b"bs" in fields and b"r" in fields:
            w.block_size, w.root = int(fields[b"bs"]), bytes.fromhex(_text(fields[b"r"]))
        self._feed(w, seq, fields.get(b"st", b""), fields.get(b"rm", b""))

    def _feed(self, w: _Worker, seq: int, st: bytes, rm: bytes) -> None:
        if not w.synced and not w.resyncing:
            if seq == 1:
                w.synced, w.seq = True, 0          # the incarnation's first entry: an empty baseline
            else:
                self._gap(w, seq)
        if w.resyncing:
            if seq > w.seq:
                w.pending.append((seq, st, rm))
                if len(w.pending) > self.max_pending:
                    lost, _, _ = w.pending.popleft()
                    w.need = max(w.need, lost)
            return
        if seq <= w.seq:
            return                                   # applied already (or covered by the snapshot)
        if seq > w.seq + 1:
            self._gap(w, seq)
            w.pending.append((seq, st, rm))
            return
        self._apply(w, st, rm)
        w.seq = seq

    def _gap(self, w: _Worker, seq: int) -> None:
        w.resyncing, w.need, w.next_poll = True, seq - 1, 0.0
        if w.synced:
            self._note(f"gap:{w.pool}/{w.worker_id}", logging.INFO,
                       "kv index: %s/%s lost KV events %d..%d; resyncing from its snapshot",
                       w.pool, w.worker_id, w.seq + 1, seq - 1)

    @staticmethod
    def _apply(w: _Worker, st: bytes, rm: bytes) -> None:
        if st:
            for i in range(0, len(st) - len(st) % _RECORD, _RECORD):
                w.blocks.add(st[i:i + DIGEST_BYTES])
        if rm:
            for i in range(0, len(rm) - len(rm) % DIGEST_BYTES, DIGEST_BYTES):
                w.blocks.discard(rm[i:i + DIGEST_BYTES])

    def _take_snapshot(self, pool: str, wid: str, snap: Mapping[bytes, bytes], now: float,
                       baseline: bool) -> bool:
        """Apply one snapshot hash. ``baseline`` (catch-up): it may introduce the worker or a new
        incarnation; otherwise (resync) it must be the worker's incarnation. Returns whether it
        was applied."""
        inc, s = _text(snap[b"i"]), int(snap[b"s"])
        registered = self._registered.get(pool, {}).get(wid)
        if registered is not None and inc != registered:
            return False                             # a replaced incarnation's, or the registry lags
        w = self._workers.get((pool, wid))
        if w is None:
            if not baseline:
                return False
            w = self._new(pool, wid, inc, now)
        if inc != w.incarnation:
            if not baseline or inc in w.dead:
                return False                         # the stream will bring the new incarnation
            self._reset(w, inc)
        if w.synced and not w.resyncing and s <= w.seq:
            return False                             # the index is at or past it already
        if (w.resyncing or not w.synced) and s < w.need:
            return False                             # does not cover the gap: wait for a newer one
        blocks = snap.get(b"blocks", b"")
        w.blocks = {blocks[i:i + DIGEST_BYTES] for i in range(0, len(blocks) - len(blocks) % _RECORD, _RECORD)}
        if b"bs" in snap and b"r" in snap:
            w.block_size, w.root = int(snap[b"bs"]), bytes.fromhex(_text(snap[b"r"]))
        was_resyncing = w.resyncing
        w.seq, w.synced, w.resyncing, w.need = s, True, False, 0
        if baseline and w.heard < now - self.silence_s:
            w.heard = now                            # give it silence_s to send its next entry
        if was_resyncing:
            log.info("kv index: %s/%s resynced from its snapshot (seq %d, %d blocks)", pool, wid, s, len(w.blocks))
        pending, w.pending = list(w.pending), deque()
        for seq, st, rm in sorted(pending, key=lambda e: e[0]):
            self._feed(w, seq, st, rm)
        return True

    # ---- internals: the tasks ----------------------------------------------------------------------
    async def _follow(self, pool: str) -> None:
        key = stream_key(self.prefix, pool)
        last_id = None
        first, most = self.backoff_s
        delay = first
        while not self._stopping:
            try:
                last_id = await self._catch_up(pool, last_id)
                if not self._stream_ok[pool] and self._attempted[pool]:
                    log.info("kv index: reading %s again", key)
                self._stream_ok[pool], self._attempted[pool] = True, True
                delay = first
                self._update_modes()
                while not self._stopping:
                    resp = await self._r.xread({key: last_id}, count=self.read_count, block=self.block_ms)
                    now = time.monotonic()
                    for _, entries in _streams(resp):
                        for entry_id, fields in entries:
                            last_id = entry_id
                            try:
                                self._on_entry(pool, fields, now)
                            except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
                                self._note(f"bad:{pool}", logging.WARNING,
                                           "kv index: skipped a malformed entry %s of %s: %s", _text(entry_id),
                                           key, exc)
                    await self._poll_snapshots(pool)
                    self._update_modes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # Redis away or failing: approximate until it answers again
                self._stream_ok[pool], self._attempted[pool] = False, True
                self._update_modes()
                self._note(f"redis:{pool}", logging.WARNING, "kv index: reading %s failed (%s: %s); retrying in "
                           "%.1f s", key, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(most, delay * 2)

    async def _catch_up(self, pool: str, last_id):
        """Read every snapshot of ``pool``; returns the stream id to read after. After a
        reconnect (``last_id`` given) whose entries are all still in the stream, that id."""
        r, key = self._r, stream_key(self.prefix, pool)
        newest = await r.xrevrange(key, count=1)
        oldest = await r.xrange(key, count=1)
        match = snapshot_key(self.prefix, pool, "*")
        names = [k async for k in r.scan_iter(match=match, count=500)]
        snaps = []
        if names:
            async with r.pipeline(transaction=False) as pipe:
                for k in names:
                    pipe.hgetall(k)
                snaps = await pipe.execute()
        now = time.monotonic()
        skip = len(match) - 1
        oldest_t = None
        for name, snap in zip(names, snaps):
            if not snap:
                continue
            wid = _text(name)[skip:]
            try:
                if self._take_snapshot(pool, wid, snap, now, baseline=True):
                    t = float(snap.get(b"t", 0) or 0)
                    if t > 0:
                        oldest_t = t if oldest_t is None else min(oldest_t, t)
            except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
                self._note(f"bad:{pool}", logging.WARNING, "kv index: skipped a malformed snapshot %s: %s",
                           _text(name), exc)
        if last_id is not None and oldest and _id_key(oldest[0][0]) <= _id_key(last_id):
            return last_id                           # nothing was trimmed away meanwhile
        if not newest or oldest_t is None:
            return "0-0"                             # no snapshot: the whole (capped) stream
        start = newest[0][0]
        if oldest_t is not None:
            # from a little before the oldest snapshot: the entries after it fill in
            since = f"{max(0, int((oldest_t - self.catchup_slack_s) * 1000))}-0"
            if _id_key(since) < _id_key(start):
                start = since
        return start

    async def _poll_snapshots(self, pool: str) -> None:
        now = time.monotonic()
        due = [w for w in self._in_pool(pool) if w.resyncing and w.next_poll <= now]
        if not due:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for w in due:
                pipe.hgetall(snapshot_key(self.prefix, pool, w.worker_id))
            snaps = await pipe.execute()
        now = time.monotonic()
        for w, snap in zip(due, snaps):
            w.next_poll = now + self.resync_poll_s
            if snap and self._workers.get((pool, w.worker_id)) is w:
                try:
                    self._take_snapshot(pool, w.worker_id, snap, now, baseline=False)
                except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
                    self._note(f"bad:{pool}", logging.WARNING, "kv index: skipped a malformed snapshot of "
                               "%s/%s: %s", pool, w.worker_id, exc)

    async def _tick(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.tick_s)
            try:
                self._sweep_history(time.monotonic())
                self._update_modes()
            except Exception:   # never let the ticker die
                log.exception("kv index: mode update failed")

    def _sweep_history(self, now: float) -> None:
        for key, h in list(self._history.items()):
            od = h.expiry
            while od:
                x, expires = next(iter(od.items()))
                if expires > now:
                    break
                del od[x]
            if not od:
                del self._history[key]

    # ---- modes -----------------------------------------------------------------------------------
    def _compute(self, pool: str, now: float) -> tuple[str, str]:
        if not self._stream_ok.get(pool, False):
            return APPROXIMATE, "its KV event stream cannot be read"
        live = [w for w in self._in_pool(pool) if w.absent_since is None]
        silent = sorted(w.worker_id for w in live if now - w.heard > self.silence_s)
        if silent:
            return APPROXIMATE, f"no KV events from {', '.join(silent)} for over {self.silence_s:g} s"
        catching = sorted(w.worker_id for w in live if w.resyncing or not w.synced)
        if catching:
            return RESYNCING, f"catching up on {', '.join(catching)}"
        return EXACT, f"{len(live)} workers indexed"

    def _update_modes(self) -> None:
        now = time.monotonic()
        for pool in self.pools:
            if not self._attempted[pool]:
                continue
            mode, why = self._compute(pool, now)
            old = self._modes.get(pool)
            if mode == old:
                continue
            self._modes[pool] = mode
            level = logging.WARNING if old == EXACT else logging.INFO
            log.log(level, "kv index for the %s pool: %s%s (%s)", pool, mode,
                    "" if old is None else f", was {old}", why)

    def _note(self, key: str, level: int, fmt: str, *args) -> None:
        """``log.log(level, fmt, *args)`` at most once per ``warn_interval_s`` per ``key``."""
        now = time.monotonic()
        last, held = self._warned.get(key, (float("-inf"), 0))
        if now - last < self._warn_interval_s:
            self._warned[key] = (last, held + 1)
            return
        self._warned[key] = (now, 0)
        log.log(level, fmt + (f" ({held} more like this in the last {self._warn_interval_s:.0f} s)" if held else ""),
                *args)
