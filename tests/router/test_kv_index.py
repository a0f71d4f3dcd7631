"""The router's KV index (issue 22, part 2) against a real Redis, fed entries and snapshots
written by hand in the workers' wire format (``router.kv_index``'s module docstring): two
workers indexed and queried, a lost range detected and resynced from a snapshot, a restart
caught up from snapshot + stream, a new incarnation replacing the old entries, a departed worker
kept through a registry gap and dropped after the grace, ``approximate`` predictions from the
routing history when events stop, a Redis outage and return, and the mode's gauge and log lines.
Timing constants are shrunk so each test takes about a second."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from types import SimpleNamespace

import pytest
import redis

from common.kv_hash import block_hashes, chain_root
from common.prom import RouterMetrics
from router.kv_index import (APPROXIMATE, EXACT, MODES, RESYNCING, KvIndex, PromptHashes, hashes_for,
                             snapshot_key, stream_key)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFIX = "cleave:"
BS = 4
LAYOUT = SimpleNamespace(tp=1, pp=1, cp=1, ep=1)
ROOT = chain_root("compat-a", LAYOUT)
ROOT_TP2 = chain_root("compat-a", SimpleNamespace(tp=2, pp=1, cp=1, ep=1))
P1 = list(range(100, 114))            # 3 full blocks + 2 tokens
P2 = list(range(200, 216))            # 4 full blocks
FAST = dict(silence_s=1.0, resync_poll_s=0.1, block_ms=50, tick_s=0.05, backoff_s=(0.05, 0.2), grace_s=0.5,
            warn_interval_s=0.0, catchup_slack_s=2.0)


class Pub:
    """One worker's publisher, by hand: stream entries and snapshots in the wire format."""

    def __init__(self, url: str, wid: str, inc: str = "inc-1", pool: str = "decode", root: bytes = ROOT,
                 bs: int = BS) -> None:
        self.r = redis.Redis.from_url(url)
        self.wid, self.inc, self.pool, self.root, self.bs = wid, inc, pool, root, bs
        self.seq = 0
        self.held: dict[bytes, bytes] = {}    # hash -> parent, what the worker holds

    def send(self, st: bytes = b"", rm: bytes = b"", lose: bool = False) -> None:
        """One entry (``lose``: its sequence number is used but it never reaches the stream)."""
        self.seq += 1
        if lose:
            return
        fields = {"w": self.wid, "i": self.inc, "s": str(self.seq), "bs": str(self.bs), "r": self.root.hex()}
        if st:
            fields["st"] = st
        if rm:
            fields["rm"] = rm
        self.r.xadd(stream_key(PREFIX, self.pool), fields, maxlen=200_000, approximate=True)

    def store(self, tokens, lose: bool = False) -> list[bytes]:
        hashes, parent, records = block_hashes(tokens, self.bs, self.root), self.root, []
        for h in hashes:
            if h not in self.held:
                self.held[h] = parent
                records.append(h + parent)
            parent = h
        self.send(st=b"".join(records), lose=lose)
        return hashes

    def remove(self, hashes, lose: bool = False) -> None:
        for h in hashes:
            self.held.pop(h, None)
        self.send(rm=b"".join(hashes), lose=lose)

    def beat(self) -> None:
        self.send()

    def snapshot(self, s: int | None = None, held: dict[bytes, bytes] | None = None) -> None:
        """What it holds now (or ``held``, as of entry ``s``)."""
        held = self.held if held is None else held
        self.r.hset(snapshot_key(PREFIX, self.pool, self.wid), mapping={
            "i": self.inc, "s": str(self.seq if s is None else s), "bs": str(self.bs), "r": self.root.hex(),
            "t": repr(time.time()), "blocks": b"".join(h + p for h, p in held.items())})

    def restart(self, inc: str) -> None:
        self.inc, self.seq, self.held = inc, 0, {}

    def close(self) -> None:
        self.r.close()


async def until(cond, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.02)


async def beating(*pubs, every: float = 0.1) -> None:
    """Heartbeats from ``pubs`` until cancelled."""
    while True:
        for p in pubs:
            p.beat()
        await asyncio.sleep(every)


def index(url: str, **kw) -> KvIndex:
    from common.registry import connect_redis
    return KvIndex(connect_redis(url), PREFIX, **{**FAST, **kw})


async def stopped(idx: KvIndex) -> None:
    await idx.stop()
    await idx._client.aclose()


# ---- hashing ----------------------------------------------------------------------------------

def test_prompt_hashes_are_the_workers_chain_computed_once_per_root():
    h = PromptHashes(P1)
    assert h.all(ROOT, BS) == hashes_for(P1, ROOT, BS) == block_hashes(P1, BS, ROOT)
    assert h.upto(ROOT_TP2, BS, 1) == block_hashes(P1, BS, ROOT_TP2)[:1]      # lazily, as far as asked
    assert h.prefix_blocks(ROOT, BS, lambda x: True) == 3                      # whole blocks only
    held = set(block_hashes(P1, BS, ROOT)[:2])
    assert h.prefix_blocks(ROOT, BS, held.__contains__) == 2
    assert sorted(h._chains) == sorted([(ROOT, BS), (ROOT_TP2, BS)])


# ---- events -----------------------------------------------------------------------------------

def test_two_workers_are_indexed_and_queried(redis_url):
    a, b = Pub(redis_url, "decode-a"), Pub(redis_url, "decode-b", root=ROOT_TP2)
    pre = Pub(redis_url, "prefill-a", pool="prefill")

    async def main():
        idx = index(redis_url)
        await idx.start()
        beats = asyncio.create_task(beating(a, b, pre))
        try:
            a.store(P1)
            b.store(P1[:BS])
            b.store(P2)
            pre.store(P2)
            await until(lambda: idx.cached_tokens("decode", "decode-a", P1) == 12, what="a's blocks")
            await until(lambda: idx.cached_tokens("decode", "decode-b", P2) == 16, what="b's blocks")
            hashes = PromptHashes(P1)
            assert idx.match("decode", P1, hashes=hashes) == {"decode-a": 12, "decode-b": 4}
            assert sorted(hashes._chains) == sorted([(ROOT, BS), (ROOT_TP2, BS)])   # one pass per root
            assert idx.cached_tokens("decode", "decode-a", P2) == 0
            assert idx.cached_tokens("decode", "nobody", P1) == 0
            assert idx.cached_tokens("prefill", "prefill-a", P2) == 16                # pools apart
            assert idx.cached_tokens("prefill", "decode-a", P1) == 0
            assert idx.root_of("decode", "decode-b") == (ROOT_TP2, BS)
            assert idx.blocks("decode") == 3 + 1 + 4 and idx.blocks("prefill") == 4
            # an evicted middle block ends the matched prefix there
            a.remove([block_hashes(P1, BS, ROOT)[1]])
            await until(lambda: idx.cached_tokens("decode", "decode-a", P1) == 4, what="the removal")
            await until(lambda: idx.mode("decode") == EXACT and idx.mode("prefill") == EXACT, what="exact")
        finally:
            beats.cancel()
            await stopped(idx)

    asyncio.run(main())
    for p in (a, b, pre):
        p.close()


def test_a_lost_range_is_detected_and_resynced_from_a_snapshot(redis_url, caplog):
    a = Pub(redis_url, "decode-a")
    caplog.set_level(logging.INFO, logger="router.kv_index")

    async def main():
        idx = index(redis_url, silence_s=3.0)
        await idx.start()
        try:
            a.store(P1[:BS])
            await until(lambda: idx.cached_tokens("decode", "decode-a", P1) == 4, what="the first entry")
            a.store(P1[:2 * BS], lose=True)                       # seq 2 never arrives
            a.store(P1)                                            # seq 3: a gap
            held_at_3 = dict(a.held)
            await until(lambda: idx.mode("decode") == RESYNCING, what="resyncing")
            assert idx.describe("decode")["decode-a"]["resyncing"]
            assert idx.cached_tokens("decode", "decode-a", P1) == 4   # what it knew; seq 3 waits
            a.snapshot(s=1)                                        # too old: does not cover seq 2
            await asyncio.sleep(0.5)
            assert idx.mode("decode") == RESYNCING
            a.beat()                                               # seq 4, buffered
            a.store(P2)                                            # seq 5, buffered
            a.snapshot(s=3, held=held_at_3)                        # covers the gap
            await until(lambda: idx.mode("decode") == EXACT, what="resynced")
            assert idx.cached_tokens("decode", "decode-a", P1) == 12
            assert idx.cached_tokens("decode", "decode-a", P2) == 16      # buffered entries applied
            assert idx.describe("decode")["decode-a"]["seq"] == 5
        finally:
            await stopped(idx)

    asyncio.run(main())
    a.close()
    text = caplog.text
    assert "lost KV events 2..2" in text and "resynced from its snapshot (seq 3" in text


def test_a_restarted_router_catches_up_from_snapshot_and_stream(redis_url, caplog):
    a, b = Pub(redis_url, "decode-a"), Pub(redis_url, "decode-b")
    caplog.set_level(logging.INFO, logger="router.kv_index")

    async def main():
        first = index(redis_url)
        await first.start()
        a.store(P1[:BS])
        await until(lambda: first.cached_tokens("decode", "decode-a", P1) == 4, what="first router")
        await stopped(first)
        # while no router reads: more events, a snapshot in the middle, more events after it
        a.store(P1[:2 * BS])
        b.store(P2)
        a.snapshot()
        b.snapshot()
        a.store(P1)
        b.remove([block_hashes(P2, BS, ROOT)[3]])
        second = index(redis_url)
        await second.start()
        beats = asyncio.create_task(beating(a, b))
        try:
            await until(lambda: second.cached_tokens("decode", "decode-a", P1) == 12, what="caught up a")
            await until(lambda: second.cached_tokens("decode", "decode-b", P2) == 12, what="caught up b")
            await until(lambda: second.mode("decode") == EXACT, what="exact")
        finally:
            beats.cancel()
            await stopped(second)

    asyncio.run(main())
    a.close()
    b.close()
    assert "lost KV events" not in caplog.text and "resynced" not in caplog.text


def test_a_new_incarnation_replaces_the_old_entries(redis_url):
    a = Pub(redis_url, "decode-a", inc="old")

    async def main():
        idx = index(redis_url, silence_s=3.0)
        await idx.start()
        try:
            a.store(P1)
            await until(lambda: idx.cached_tokens("decode", "decode-a", P1) == 12, what="old entries")
            old = Pub(redis_url, "decode-a", inc="old")
            old.seq = a.seq
            a.restart("new")                                       # the worker restarted: seq 1 again
            a.store(P2)
            await until(lambda: idx.cached_tokens("decode", "decode-a", P2) == 16, what="new entries")
            assert idx.cached_tokens("decode", "decode-a", P1) == 0
            old.store(P1)                                          # a late entry of the replaced one
            a.beat()
            await until(lambda: idx.describe("decode")["decode-a"]["seq"] == 2, what="the beat")
            assert idx.cached_tokens("decode", "decode-a", P1) == 0
            assert idx.mode("decode") == EXACT
            old.close()
            # the registry names another incarnation than the events: the entries go at once
            idx.sync_workers("decode", {"decode-a": "newer"})
            assert idx.cached_tokens("decode", "decode-a", P2) == 0
            assert idx.describe("decode")["decode-a"]["incarnation"] == "newer"
        finally:
            await stopped(idx)

    asyncio.run(main())
    a.close()


def test_an_absent_worker_is_kept_through_a_gap_and_dropped_after_the_grace(redis_url, caplog):
    a, b = Pub(redis_url, "decode-a"), Pub(redis_url, "decode-b")
    caplog.set_level(logging.INFO, logger="router.kv_index")

    async def main():
        idx = index(redis_url, grace_s=30.0)
        await idx.start()
        try:
            a.store(P1)
            b.store(P2)
            await until(lambda: idx.blocks("decode") == 7, what="both indexed")
            both = {"decode-a": "inc-1", "decode-b": "inc-1"}
            t0 = time.monotonic()
            idx.sync_workers("decode", both, now=t0)
            idx.sync_workers("decode", {"decode-b": "inc-1"}, now=t0 + 1)      # a registry gap
            idx.sync_workers("decode", {"decode-b": "inc-1"}, now=t0 + 2.5)
            assert idx.cached_tokens("decode", "decode-a", P1) == 12
            idx.sync_workers("decode", both, now=t0 + 3)                       # back: kept
            idx.sync_workers("decode", {"decode-b": "inc-1"}, now=t0 + 4)
            idx.sync_workers("decode", {"decode-b": "inc-1"}, now=t0 + 33)     # 29 s absent: kept
            assert "decode-a" in idx.describe("decode")
            idx.sync_workers("decode", {"decode-b": "inc-1"}, now=t0 + 34.5)   # past the grace
            assert "decode-a" not in idx.describe("decode")
            assert idx.cached_tokens("decode", "decode-a", P1) == 0
            assert idx.cached_tokens("decode", "decode-b", P2) == 16
            assert idx.blocks("decode") == 4
        finally:
            await stopped(idx)

    asyncio.run(main())
    a.close()
    b.close()
    assert caplog.text.count("dropped decode/decode-a") == 1


def test_the_directory_refresh_feeds_the_registry(redis_url):
    from common.registry import WorkerRecord, connect_redis, worker_key
    from router.workers import WorkerDirectory

    def record(wid, inc):
        return WorkerRecord(pool="decode", worker_id=wid, address=f"127.0.0.1:{9000 + len(wid)}", incarnation=inc,
                            layout={"tp": 1, "pp": 1, "cp": 1, "ep": 1}, capacity={}, load={})

    async def main():
        client = connect_redis(redis_url)
        idx = KvIndex(client, PREFIX, **FAST)
        directory = WorkerDirectory(client, PREFIX, 0.5)
        directory.on_refresh = idx.sync_registry
        await client.hset(worker_key(PREFIX, "decode", "decode-a"), mapping=record("decode-a", "i1").to_hash())
        await directory.refresh()
        assert idx.describe("decode")["decode-a"]["incarnation"] == "i1"
        await client.delete(worker_key(PREFIX, "decode", "decode-a"))
        await directory.refresh()
        assert idx.describe("decode")["decode-a"]["absent_s"] is not None
        await directory.stop()
        await client.aclose()

    asyncio.run(main())


# ---- approximate mode, outages, the gauge -------------------------------------------------------

def test_silent_workers_turn_the_pool_approximate_and_history_predicts(redis_url):
    a = Pub(redis_url, "decode-a")

    async def main():
        idx = index(redis_url, silence_s=0.5, history_ttl_s=1.0)
        await idx.start()
        try:
            a.store(P1[:BS])
            await until(lambda: idx.mode("decode") == EXACT, what="exact")
            idx.note_routed("decode", "decode-a", "inc-1", ROOT.hex(), BS, P2)
            idx.note_routed("decode", "decode-a", "inc-1", ROOT, BS, P1)
            assert idx.cached_tokens("decode", "decode-a", P2) == 0         # exact: events only
            await until(lambda: idx.mode("decode") == APPROXIMATE, what="approximate")   # no beats
            assert idx.cached_tokens("decode", "decode-a", P2) == 16        # predicted from routing
            assert idx.cached_tokens("decode", "decode-a", P1) == 12        # events + routing
            assert idx.match("decode", P2) == {"decode-a": 16}
            # a worker the events never named is predicted too
            idx.note_routed("decode", "decode-z", "z1", ROOT, BS, P2)
            assert idx.cached_tokens("decode", "decode-z", P2) == 16
            await until(lambda: idx.cached_tokens("decode", "decode-a", P2) == 0, what="the history TTL")
            assert idx.cached_tokens("decode", "decode-a", P1) == 4         # its last events still count
            idx.note_routed("decode", "decode-a", "inc-1", ROOT, BS, P2)
            a.beat()                                                        # events again: exact
            await until(lambda: idx.mode("decode") == EXACT, what="exact again")
            assert idx.cached_tokens("decode", "decode-a", P2) == 0
        finally:
            await stopped(idx)

    asyncio.run(main())
    a.close()


def _restart_redis(port: int) -> subprocess.Popen:
    import shutil
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.time() < deadline, "redis did not come back"
            time.sleep(0.05)
    client.close()
    return proc


def test_a_redis_outage_turns_approximate_without_failing_queries_and_recovers(caplog):
    from tests.conftest import start_redis
    proc, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    caplog.set_level(logging.INFO, logger="router.kv_index")
    a = Pub(url, "decode-a")

    async def main():
        nonlocal proc, a
        idx = index(url)
        await idx.start()
        try:
            a.store(P1)
            await until(lambda: idx.mode("decode") == EXACT and idx.cached_tokens("decode", "decode-a", P1) == 12,
                        what="exact")
            proc.kill()
            proc.wait()
            await until(lambda: idx.mode("decode") == APPROXIMATE, what="approximate on the outage")
            assert idx.cached_tokens("decode", "decode-a", P1) == 12        # answers from what it knew
            idx.note_routed("decode", "decode-a", "inc-1", ROOT, BS, P2)
            assert idx.cached_tokens("decode", "decode-a", P2) == 16
            await asyncio.sleep(0.5)                                        # a few failed reconnects
            proc = _restart_redis(port)                                     # empty: the worker republishes
            a.close()
            a = Pub(url, "decode-a")
            a.seq, a.held = 7, {h: ROOT for h in block_hashes(P2, BS, ROOT)}
            a.snapshot()
            a.beat()
            await until(lambda: idx.mode("decode") == EXACT, what="exact after the outage")
            assert idx.cached_tokens("decode", "decode-a", P2) == 16 and idx.cached_tokens("decode", "decode-a",
                                                                                         P1) == 0
        finally:
            await stopped(idx)

    try:
        asyncio.run(main())
    finally:
        a.close()
        proc.kill()
        proc.wait()
    assert "reading cleave:kv-events:decode failed" in caplog.text
    assert "reading cleave:kv-events:decode again" in caplog.text


def test_each_change_of_mode_moves_the_gauge_and_is_logged_once(redis_url, caplog):
    a = Pub(redis_url, "decode-a")
    caplog.set_level(logging.INFO, logger="router.kv_index")

    def gauge(metrics: RouterMetrics) -> dict[str, float]:
        out = {}
        for line in metrics.exposition().decode().splitlines():
            if line.startswith("cleave_kv_index_mode{") and 'pool="decode"' in line:
                mode = line.split('mode="')[1].split('"')[0]
                out[mode] = float(line.rsplit(" ", 1)[1])
        return out

    async def main():
        idx = index(redis_url, silence_s=0.4, pools=("decode",))
        metrics = RouterMetrics("m", running=lambda: 0, waiting=lambda: 0)
        metrics.kv_index(idx.modes, idx.block_counts, MODES)
        await idx.start()
        seen = []
        try:
            a.store(P1)
            await until(lambda: idx.mode("decode") == EXACT, what="exact")
            seen.append(gauge(metrics))
            await until(lambda: idx.mode("decode") == APPROXIMATE, what="approximate")
            seen.append(gauge(metrics))
            await asyncio.sleep(0.3)                                  # stays approximate: no new line
            beats = asyncio.create_task(beating(a))
            await until(lambda: idx.mode("decode") == EXACT, what="exact again")
            beats.cancel()
            seen.append(gauge(metrics))
            assert 'cleave_kv_index_blocks{model_name="m",pool="decode"} 3.0' in metrics.exposition().decode()
        finally:
            await stopped(idx)
        return seen

    seen = asyncio.run(main())
    a.close()
    assert seen == [{EXACT: 1.0, RESYNCING: 0.0, APPROXIMATE: 0.0}, {EXACT: 0.0, RESYNCING: 0.0, APPROXIMATE: 1.0},
                    {EXACT: 1.0, RESYNCING: 0.0, APPROXIMATE: 0.0}]
    lines = [r for r in caplog.records if "kv index for the decode pool" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(": ")[1].split(" (")[0]) for r in lines] == [
        ("INFO", "exact"), ("WARNING", "approximate, was exact"), ("INFO", "exact, was approximate")]


def test_the_router_core_reports_the_mode_in_model_info(redis_url):
    from cleave.v1 import inference_pb2 as pb
    from common.config import RouterConfig
    from common.model import ModelConfig
    from common.registry import connect_redis
    from router.core import RouterCore
    from router.text import TextCodec

    class Tok:
        chat_template = None

        def get_vocab(self):
            return {"ab": 0}

    model = ModelConfig(architecture="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position=64, tie_word_embeddings=False)
    a = Pub(redis_url, "decode-a")

    async def main():
        core = RouterCore(RouterConfig(redis_url=redis_url), "m", model, TextCodec(Tok()), connect_redis(redis_url))
        await core.start()
        try:
            a.store(P1)
            await until(lambda: core.kv_index.blocks("decode") == 3, what="indexed")
            info = core.model_info()
            pools = {p.pool: p for p in info.pools}
            assert pools["decode"].kv_index_blocks == 3
            assert pools["decode"].kv_index_mode in MODES and pools["prefill"].kv_index_mode == EXACT
            assert "cleave_kv_index_mode{" in core.prom.exposition().decode()
            assert isinstance(info, pb.ModelInfo)
        finally:
            await core.close()

    asyncio.run(main())
    a.close()
