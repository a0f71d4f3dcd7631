"""Load metrics the planner reads, under ``<prefix>metrics:`` in Redis (DESIGN §7).

| key | type | written by | content |
| --- | --- | --- | --- |
| ``<prefix>metrics:ttft`` | ZSET | router, at each first token | member ``<request_id>:<seconds>``, score = unix time |
| ``<prefix>metrics:tpot`` | ZSET | router, when a request finishes | seconds per output token after the first |
| ``<prefix>metrics:router:<id>`` | HASH, TTL | each router, every second | ``waiting_for_kv``, ``active`` |

Samples older than the window are trimmed by the writer, so the sets stay small. Pool load
that workers already publish in their registry records (queued prefill tokens, free KV
blocks, running sequences; see ``common.registry``) is not repeated here. Writes are best
effort: a Redis outage never fails a request.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

log = logging.getLogger(__name__)

LATENCIES = ("ttft", "tpot")


def latency_key(prefix: str, kind: str) -> str:
    if kind not in LATENCIES:
        raise ValueError(f"latency kind must be one of {LATENCIES}, got {kind!r}")
    return f"{prefix}metrics:{kind}"


def router_key(prefix: str, router_id: str) -> str:
    return f"{prefix}metrics:router:{router_id}"


class MetricsWriter:
    """Owned by a router: records latency samples and its own queue (async Redis client).

    :meth:`record` never waits for Redis: samples are kept (at most ``max_pending``, the
    newest) and written by :meth:`flush`, which the router's health loop calls every beat
    and which gives up after ``write_timeout_s`` when Redis does not answer.
    """

    def __init__(self, client, prefix: str, router_id: str, window_s: float = 300.0,
                 write_timeout_s: float = 1.0, max_pending: int = 10_000) -> None:
        self._client = client
        self._prefix = prefix
        self._router_id = router_id
        self._window_s = window_s
        self._write_timeout_s = write_timeout_s
        self._pending: collections.deque = collections.deque(maxlen=max_pending)

    def record(self, kind: str, request_id: str, seconds: float) -> None:
        """Keep one latency sample (``kind`` in LATENCIES, ``seconds`` >= 0) for the next flush."""
        self._pending.append((latency_key(self._prefix, kind), f"{request_id}:{seconds:.6f}", time.time()))

    async def sample(self, kind: str, request_id: str, seconds: float) -> None:
        """Record one sample and write it now (best effort)."""
        self.record(kind, request_id, seconds)
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        t = time.time()
        try:
            async with asyncio.timeout(self._write_timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, member, when in batch:
                        pipe.zadd(key, {member: when})
                    for key in {key for key, _, _ in batch}:
                        pipe.zremrangebyscore(key, "-inf", t - self._window_s)
                    await pipe.execute()
        except (Exception, TimeoutError) as exc:
            self._pending.extendleft(reversed(batch))  # kept (bounded) for the next beat
            log.debug("could not record latency samples: %s", exc)

    async def publish(self, waiting_for_kv: int, active: int, ttl_s: float = 5.0) -> None:
        key = router_key(self._prefix, self._router_id)
        try:
            async with asyncio.timeout(self._write_timeout_s):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping={"waiting_for_kv": waiting_for_kv, "active": active})
                    pipe.pexpire(key, int(ttl_s * 1000))
                    await pipe.execute()
        except (Exception, TimeoutError) as exc:
            log.debug("could not publish router load: %s", exc)
        await self.flush()


async def read_latencies(client, prefix: str, kind: str, since: float) -> list[float]:
    """Latency samples (seconds) recorded at or after unix time ``since``."""
    members = await client.zrangebyscore(latency_key(prefix, kind), since, "+inf")
    values = []
    for m in members:
        m = m.decode() if isinstance(m, bytes) else m
        try:
            values.append(float(m.rsplit(":", 1)[1]))
        except (IndexError, ValueError):
            log.warning("ignoring malformed %s sample %r", kind, m)
    return values


async def read_waiting_for_kv(client, prefix: str) -> int:
    """Requests waiting for decode KV room, summed over live routers."""
    total = 0
    async for key in client.scan_iter(match=router_key(prefix, "*"), count=100):
        value = await client.hget(key, "waiting_for_kv")
        total += int(value or 0)
    return total


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by nearest rank; None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
