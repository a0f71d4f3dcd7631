"""KV events in Redis (``services.kv_events``): a publisher over a real ``BlockManager`` and a
real Redis (the ``redis_url`` fixture, or a private server a test pauses, stops and starts).

What a router's index relies on: commits become ``st`` records with their chain parents and
evictions ``rm`` hashes, in an order that applying each entry's ``st`` then its ``rm`` never
changes; sequence numbers run from 1 without a hole unless events were lost; an idle worker
still sends heartbeat entries; the snapshot equals ``BlockManager.snapshot()`` and names, in
``s``, the last entry it includes; the stream is capped; a Redis outage (paused server, dead
port) loses at most what the pending list cannot hold, shows that loss as a skipped sequence
number followed by a fresh snapshot, raises nothing, and never holds the block manager's lock
across a Redis call; the worker starts the publisher with ``--kv-events`` and deletes its
snapshot on a clean stop.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest
import redis

from common.kv_hash import block_hashes
from common.prom import WorkerMetrics
from common.registry import connect_redis
from engine import block_manager as bm_module
from engine.block_manager import REMOVED, STORED, BlockEvent, BlockManager
from services.kv_events import (STREAM_MAXLEN, KvEventPublisher, cut_entries, decode_entry, decode_snapshot,
                                snapshot_key, stream_key)

pytestmark = pytest.mark.timeout(60)

ROOT = bytes(range(16))
BS = 4
PREFIX = "cleave:"


def _bm(num_blocks: int = 9) -> BlockManager:
    return BlockManager(num_blocks, BS, ROOT)


def _publisher(client, blocks: BlockManager, **kw) -> KvEventPublisher:
    kw = {"batch_s": 0.01, "heartbeat_s": 0.1, "snapshot_s": 0.2, "timeout_s": 0.5, **kw}
    return KvEventPublisher(client, PREFIX, "decode", "decode-0", "inc-1", blocks, **kw)


def _fill(blocks: BlockManager, owner: str, tokens: list[int], release: bool = True) -> list[bytes]:
    """Allocate, commit and (by default) release ``tokens`` as ``owner``; their block hashes."""
    blocks.allocate(owner, tokens, len(tokens))
    blocks.commit(owner, tokens)
    if release:
        blocks.release(owner)
    return block_hashes(tokens, BS, ROOT)


def _entries(url: str, pool: str = "decode") -> list:
    with redis.Redis.from_url(url) as r:
        return [decode_entry(fields) for _, fields in r.xrange(stream_key(PREFIX, pool))]


def _snapshot(url: str):
    with redis.Redis.from_url(url) as r:
        fields = r.hgetall(snapshot_key(PREFIX, "decode", "decode-0"))
    return decode_snapshot(fields) if fields else None


def _apply(index: dict, entries) -> dict:
    """A consumer: each entry's ``st`` then its ``rm``; ``index``: hash -> parent."""
    for e in entries:
        index.update(e.stored)
        for h in e.removed:
            index.pop(h, None)
    return index


def _dedup(entries) -> list:
    """Entries in sequence order, each number once (a retried write may land twice)."""
    out, last = [], 0
    for e in entries:
        if e.seq > last:
            out.append(e)
            last = e.seq
    return out


def _run(coro):
    return asyncio.run(coro)


# ---- the entry format, without Redis ---------------------------------------------------------
@pytest.mark.unit
def test_cut_entries_never_reorders_events_on_one_hash():
    rng = random.Random(0)
    hashes = [bytes([i]) * 16 for i in range(6)]
    for _ in range(500):
        held: set[bytes] = set()
        events = []
        for _ in range(rng.randrange(1, 40)):   # a valid history: store what is absent, remove what is held
            h = rng.choice(hashes)
            kind = REMOVED if h in held else STORED
            (held.discard if kind == REMOVED else held.add)(h)
            events.append(BlockEvent(kind, h, ROOT, BS))
        entries = cut_entries(events, max_events=rng.choice([3, 4096]))
        index: dict = {}
        for stored, removed in entries:
            index.update(stored)
            for h in removed:
                index.pop(h, None)
        assert set(index) == held
        flat = [(STORED, h) for s, r in entries for h, _ in s] + [(REMOVED, h) for s, r in entries for h in r]
        assert sorted(flat) == sorted((e.kind, e.block_hash) for e in events)   # nothing lost or added
    # a store of a hash removed earlier in the same batch starts a new entry
    a, b = hashes[:2]
    entries = cut_entries([BlockEvent(STORED, a, ROOT, BS), BlockEvent(REMOVED, a, ROOT, BS),
                           BlockEvent(STORED, b, a, BS), BlockEvent(STORED, a, ROOT, BS)])
    assert entries == [([(a, ROOT), (b, a)], [a]), ([(a, ROOT)], [])]


# ---- against a real Redis ----------------------------------------------------------------------
@pytest.mark.integration
def test_commits_store_with_parents_evictions_remove_and_sequence_is_contiguous(redis_url):
    blocks = _bm(num_blocks=5)   # 4 usable blocks of 4 tokens
    metrics = WorkerMetrics("decode", lambda: "decode-0", "tp1-pp1-cp1-ep1")

    async def main():
        client = connect_redis(redis_url)   # the worker's own client (decoded responses)
        pub = _publisher(client, blocks, metrics=metrics, heartbeat_s=60)
        await pub.start()
        first = _fill(blocks, "a", list(range(12)))              # 3 blocks stored, then cached
        await pub.tick()
        second = _fill(blocks, "b", list(range(100, 116)))       # 4 blocks: evicts the 3 cached
        await pub.tick()
        await pub.tick()                                          # nothing new: no entry
        await client.aclose()
        return first, second, pub

    first, second, pub = _run(main())
    entries = _entries(redis_url)
    assert [e.seq for e in entries] == [1, 2]
    assert all((e.worker_id, e.incarnation, e.block_size, e.root) == ("decode-0", "inc-1", BS, ROOT) for e in entries)
    assert entries[0].stored == list(zip(first, [ROOT, *first[:-1]])) and entries[0].removed == []
    assert entries[1].stored == list(zip(second, [ROOT, *second[:-1]]))
    assert sorted(entries[1].removed) == sorted(first)           # evicted, tail first
    assert _apply({}, entries) == dict(blocks.snapshot())
    assert (pub.published_events, pub.dropped_events, pub.entries) == (10, 0, 2)
    sample = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}
    assert sample["cleave_kv_events_published_total"] == 10
    assert sample.get("cleave_kv_events_dropped_total", 0) == 0


@pytest.mark.integration
def test_idle_publisher_sends_heartbeat_entries_and_refreshes_its_snapshot(redis_url):
    blocks = _bm()
    _fill(blocks, "a", list(range(8)))

    async def main():
        client = connect_redis(redis_url)
        pub = _publisher(client, blocks, heartbeat_s=0.05, snapshot_s=0.15)
        await pub.start()
        snap0 = _snapshot(redis_url)
        task = asyncio.create_task(pub.run())
        await asyncio.sleep(0.6)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        snap = _snapshot(redis_url)
        await pub.close()
        gone = _snapshot(redis_url)
        await client.aclose()
        return pub, snap0, snap, gone

    pub, snap0, snap, gone = _run(main())
    # the first snapshot comes before any entry (s = 0) and already holds what was committed
    assert snap0.seq == 0 and dict(snap0.blocks) == dict(blocks.snapshot())
    assert (snap0.incarnation, snap0.block_size, snap0.root) == ("inc-1", BS, ROOT)
    entries = _entries(redis_url)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0].stored and len(entries) >= 5             # the queued events, then heartbeats
    assert all(not e.stored and not e.removed for e in entries[1:])
    assert pub.snapshots >= 3 and snap.seq >= 1 and dict(snap.blocks) == dict(blocks.snapshot())
    assert abs(snap.time - time.time()) < 5
    assert gone is None                                          # a clean stop deletes the snapshot


@pytest.mark.integration
def test_snapshot_names_the_last_entry_it_includes_and_expires(redis_url):
    blocks = _bm(num_blocks=17)

    async def main():
        client = connect_redis(redis_url)
        pub = _publisher(client, blocks, heartbeat_s=60, snapshot_s=1.0)
        await pub.start()
        for i in range(3):
            _fill(blocks, f"o{i}", list(range(100 * i, 100 * i + 8)))
            pub._last_snapshot = 0.0 if i == 2 else pub._last_snapshot   # due on the last round
            await pub.tick()
        _fill(blocks, "late", list(range(900, 904)))   # after the snapshot: in a later entry
        ttl = redis.Redis.from_url(redis_url).pttl(snapshot_key(PREFIX, "decode", "decode-0"))
        snap = _snapshot(redis_url)
        await pub.tick()
        await client.aclose()
        return snap, ttl

    snap, ttl = _run(main())
    entries = _entries(redis_url)
    assert [e.seq for e in entries] == [1, 2, 3, 4] and snap.seq == 3
    assert dict(snap.blocks) == _apply({}, entries[:3])
    assert _apply(dict(snap.blocks), [e for e in entries if e.seq > snap.seq]) == dict(blocks.snapshot())
    assert 0 < ttl <= (3 * 1.0 + 10) * 1000


@pytest.mark.integration
def test_stream_is_capped(redis_url):
    blocks = _bm()
    clock = [0.0]

    async def main():
        client = connect_redis(redis_url)
        pub = _publisher(client, blocks, heartbeat_s=1.0, maxlen=100, clock=lambda: clock[0])
        for _ in range(1000):   # a heartbeat entry per round
            clock[0] += 1.0
            await pub.tick(snapshot=False)
        await client.aclose()
        return pub

    pub = _run(main())
    with redis.Redis.from_url(redis_url) as r:
        length = r.xlen(stream_key(PREFIX, "decode"))
    assert pub.entries == 1000 and 100 <= length <= 300   # MAXLEN ~: trimmed in whole stream nodes
    assert KvEventPublisher(None, PREFIX, "decode", "w", "i", blocks).maxlen == STREAM_MAXLEN == 200_000


@pytest.mark.integration
def test_events_the_block_manager_dropped_show_as_a_gap_then_a_fresh_snapshot(redis_url, monkeypatch):
    monkeypatch.setattr(bm_module, "MAX_QUEUED_EVENTS", 4)
    blocks = _bm(num_blocks=17)

    async def main():
        client = connect_redis(redis_url)
        pub = _publisher(client, blocks, heartbeat_s=60, snapshot_s=60)
        await pub.start()
        _fill(blocks, "a", list(range(8)))
        await pub.tick()
        _fill(blocks, "b", list(range(100, 124)))   # 6 events into a queue of 4: 2 lost
        await pub.tick()
        await client.aclose()
        return pub

    pub = _run(main())
    entries = _entries(redis_url)
    assert [e.seq for e in entries] == [1, 3]     # 2 skipped: the gap
    assert len(entries[1].stored) == 4 and pub.dropped_events == 2
    snap = _snapshot(redis_url)
    assert snap.seq == 3 and dict(snap.blocks) == dict(blocks.snapshot())


class _WatchedLock:
    """A lock that knows whether it is held (``BlockManager._lock`` stand-in)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = False

    def __enter__(self):
        self._lock.acquire()
        self.held = True
        return self

    def __exit__(self, *exc):
        self.held = False
        self._lock.release()


class _CheckingClient:
    """A Redis client that records, at every call, whether the block manager's lock is held."""

    def __init__(self, inner, lock: _WatchedLock) -> None:
        self._inner, self._lock, self.calls, self.held = inner, lock, 0, 0

    def _check(self):
        self.calls += 1
        self.held += self._lock.held

    def pipeline(self, *a, **kw):
        outer, pipe = self, self._inner.pipeline(*a, **kw)

        class Pipe:
            async def __aenter__(self):
                await pipe.__aenter__()
                return self

            async def __aexit__(self, *exc):
                return await pipe.__aexit__(*exc)

            def __getattr__(self, name):
                return getattr(pipe, name)

            async def execute(self):
                outer._check()
                return await pipe.execute()
        return Pipe()

    async def delete(self, *keys):
        self._check()
        return await self._inner.delete(*keys)


def _start_redis_on(port: int) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


@pytest.mark.integration
def test_paused_redis_gives_a_gap_and_a_fresh_snapshot_without_blocking_the_block_manager(caplog):
    from engine.parallel import free_port

    port = free_port()
    proc = _start_redis_on(port)
    url = f"redis://127.0.0.1:{port}/0"
    blocks = _bm(num_blocks=65)
    lock = blocks._lock = _WatchedLock()
    metrics = WorkerMetrics("decode", lambda: "decode-0", "tp1-pp1-cp1-ep1")
    caplog.set_level(logging.WARNING, logger="services.kv_events")
    try:
        async def main():
            client = _CheckingClient(connect_redis(url), lock)
            pub = _publisher(client, blocks, metrics=metrics, heartbeat_s=60, snapshot_s=60, timeout_s=0.3,
                             max_pending=8)
            await pub.start()
            _fill(blocks, "a", list(range(8)))          # 2 events, published
            await pub.tick()
            os.kill(proc.pid, signal.SIGSTOP)           # Redis freezes
            commit_s = []
            for i in range(6):                          # 6 x 4 events: 24 while the pending list holds 8
                t0 = time.perf_counter()
                _fill(blocks, f"o{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 16)))
                commit_s.append(time.perf_counter() - t0)
                tick = asyncio.create_task(pub.tick())
                await asyncio.sleep(0.05)               # the round is waiting on Redis now ...
                t0 = time.perf_counter()
                blocks.match(list(range(8)))            # ... and the block manager is free
                commit_s.append(time.perf_counter() - t0)
                await tick
            os.kill(proc.pid, signal.SIGCONT)
            for _ in range(50):
                await pub.tick()
                if not pub._inflight and not pub._pending and pub._last_snapshot is not None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)   # writes the frozen server took late land now
            _fill(blocks, "after", list(range(50_000, 50_004)))
            await pub.tick()
            await client._inner.aclose()
            return pub, client, commit_s

        pub, client, commit_s = _run(main())
        raw = _entries(url)
        by_seq = {}
        for e in raw:   # a write the frozen server took late may land beside its retry: same number, same content
            assert by_seq.setdefault(e.seq, e) == e
        entries = _dedup(raw)
        seqs = [e.seq for e in entries]
        assert seqs[0] == 1 and seqs[-1] == pub.seq
        assert any(b - a > 1 for a, b in zip(seqs, seqs[1:])), f"no gap in {seqs}"
        assert pub.dropped_events == 24 - 4 - 8          # the first round's 4 are held as entries, 8 pending
        snap = _snapshot(url)
        assert snap.seq >= max(b - 1 for a, b in zip(seqs, seqs[1:]) if b - a > 1)   # names the post-gap state
        assert _apply(dict(snap.blocks), [e for e in entries if e.seq > snap.seq]) == dict(blocks.snapshot())
        assert max(commit_s) < 0.1, commit_s             # never waited on Redis
        assert client.calls > 5 and client.held == 0     # no Redis call with the lock held
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]   # one at the outage, one when back
        assert "12 events dropped" in warnings[1].getMessage()
        sample = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}
        assert sample["cleave_kv_events_dropped_total"] == 12
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_dead_port_then_redis_up_publishes_with_a_gap_and_never_raises(caplog):
    from engine.parallel import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    blocks = _bm(num_blocks=33)
    caplog.set_level(logging.WARNING, logger="services.kv_events")
    proc = None
    try:
        async def main():
            nonlocal proc
            client = connect_redis(url)
            pub = _publisher(client, blocks, heartbeat_s=0.05, snapshot_s=60, timeout_s=0.3, max_pending=4)
            await pub.start()                           # nobody listens: no snapshot, no exception
            for i in range(3):
                _fill(blocks, f"o{i}", list(range(100 * i, 100 * i + 12)))
                await pub.tick()
            assert pub.entries == 0 and pub.snapshots == 0
            proc = _start_redis_on(port)
            for _ in range(20):
                await pub.tick()
                if pub.snapshots:
                    break
                await asyncio.sleep(0.05)
            await client.aclose()
            return pub

        pub = _run(main())
        entries = _entries(url)
        # the first round's 3 events were cut into entry 1 (held, sent verbatim once Redis is up);
        # the next 6 overflowed a pending list of 4: 2 lost, so 2 is skipped
        assert [e.seq for e in entries[:2]] == [1, 3] and [len(e.stored) for e in entries[:2]] == [3, 4]
        assert pub.dropped_events == 2
        snap = _snapshot(url)
        assert snap.seq == pub.seq and dict(snap.blocks) == dict(blocks.snapshot())
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


# ---- in the worker -----------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("on", [True, False])
def test_worker_publishes_with_kv_events_and_deletes_its_snapshot_on_stop(redis_url, on):
    from common.flags import replace
    from engine.runtime.fake import FakeExecutor, tiny_config
    from services import decode
    from services.config import WorkerConfig
    from services.worker import WorkerHost, start_worker

    cfg = replace(WorkerConfig(pool="decode"), worker_id="decode-0", redis_url=redis_url, key_prefix=PREFIX,
                  block_size=BS, num_blocks=16, transport="tcp", kv_events=on, kv_snapshot_interval_s=0.5)

    async def main():
        host = WorkerHost(cfg, make=functools.partial(FakeExecutor, model_config=tiny_config()))
        worker = await start_worker(host, decode.DecodeService, decode.add_to_server)
        try:
            snap = _snapshot(redis_url)
            host.blocks.allocate("x", list(range(8)), 8)
            host.blocks.commit("x", list(range(8)))
            host.blocks.release("x")
            await asyncio.sleep(1.3 if on else 0.2)
            entries = _entries(redis_url)
        finally:
            await worker.stop(grace=None)
        return host, snap, entries, _snapshot(redis_url)

    host, snap, entries, after = _run(main())
    if not on:
        assert (snap, entries) == (None, [])
        return
    assert snap.seq == 0 and snap.incarnation == host.incarnation and snap.root == host.blocks.root
    assert entries[0].worker_id == "decode-0" and len(entries[0].stored) == 2
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1)) and len(entries) >= 2   # + a heartbeat
    assert after is None


@pytest.mark.unit
def test_worker_flags():
    import argparse

    from common.flags import add_arguments, from_args
    from services.config import WorkerConfig

    parser = argparse.ArgumentParser()
    add_arguments(WorkerConfig, parser)
    cfg = from_args(WorkerConfig, parser.parse_args([]), pool="decode")
    assert cfg.kv_events is True and cfg.kv_snapshot_interval_s == 5.0
    cfg = from_args(WorkerConfig, parser.parse_args(["--no-kv-events", "--kv-snapshot-interval", "2"]), pool="decode")
    assert cfg.kv_events is False and cfg.kv_snapshot_interval_s == 2.0
    with pytest.raises(ValueError, match="kv_snapshot_interval_s"):
        WorkerConfig(pool="decode", kv_snapshot_interval_s=0)
