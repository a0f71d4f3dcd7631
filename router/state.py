"""Request state in Redis: ``<prefix>req:<request_id>`` hashes (DESIGN §7), written off the request path.

The router records each request as it moves through
``queued → prefilling → transferring → decoding → finished | failed | cancelled``.
:meth:`RequestStore.update` never waits for Redis: it merges the fields into the request's
pending write and returns. One writer task (:meth:`RequestStore.run`, started by the router)
flushes pending writes in a pipeline, each flush bounded by ``write_timeout_s``. When Redis
is down or frozen the pending writes are kept (newer fields win) and retried with backoff,
so the *latest* state of every request is written once Redis answers again, and a token
is never delayed by Redis.

Every hash carries a TTL, so none stays non-terminal forever: ``live_ttl_s`` while the
request runs (longer than any request may run, refreshed on every write), ``ttl_s`` after a
terminal state. A router that crashes mid-request leaves hashes that expire on their own.
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

TERMINAL = ("finished", "failed", "cancelled")
STATES = ("queued", "prefilling", "transferring", "decoding") + TERMINAL


class RequestStore:
    """Owned by the router; one instance shared by all requests (single event loop)."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int, live_ttl_s: int,
                 write_timeout_s: float = 2.0, max_pending: int = 100_000) -> None:
        if ttl_s < 1 or live_ttl_s < 1:
            raise ValueError(f"request hash TTLs must be >= 1 s, got ttl_s={ttl_s}, live_ttl_s={live_ttl_s}")
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._live_ttl_s = live_ttl_s
        self._write_timeout_s = write_timeout_s
        self._max_pending = max_pending
        self._pending: dict[str, dict[str, str]] = {}   # request id -> fields not yet written
        self._wake = asyncio.Event()
        self.failures = 0                                  # flushes that failed (Redis down)

    def key(self, request_id: str) -> str:
        return f"{self._prefix}req:{request_id}"

    def update(self, request_id: str, **fields) -> None:
        """Record ``fields`` for the request; returns at once (written by :meth:`run`).

        Raises ValueError for an unknown ``state``. Once a terminal state is recorded, later
        non-terminal states are ignored (a late ``decoding`` never overwrites ``finished``).
        """
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown request state {state!r}")
        _merge(self._pending.setdefault(request_id, {}),
               {k: ("" if v is None else str(v)) for k, v in fields.items()})
        if len(self._pending) > self._max_pending:  # Redis away for long: keep the newest
            oldest = next(iter(self._pending))
            log.warning("dropping unwritten state of request %s: %d requests wait for Redis",
                        oldest, len(self._pending))
            del self._pending[oldest]
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """The writer task: flush pending writes until cancelled (then one last try)."""
        delay = 0.05
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if await self.flush():
                    delay = 0.05
                else:
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    self._wake.set()
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> bool:
        """Write everything pending in one pipeline; False (and kept) when Redis failed."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            async with asyncio.timeout(self._write_timeout_s):
                async with self._client.pipeline(transaction=False) as pipe:
                    for rid, fields in batch.items():
                        key = self.key(rid)
                        pipe.hset(key, mapping=fields)
                        # terminal: expire ttl_s from now; otherwise the live TTL, refreshed
                        # by each state change (a field-only write keeps the TTL it has)
                        if fields.get("state") in TERMINAL:
                            pipe.expire(key, self._ttl_s)
                        else:
                            pipe.expire(key, self._live_ttl_s, nx="state" not in fields)
                    await pipe.execute()
            return True
        except (Exception, TimeoutError) as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                log.warning("Redis unavailable: %d request states wait to be written (%s)",
                            len(batch), exc or type(exc).__name__)
            for rid, fields in batch.items():  # newer fields (recorded meanwhile) win
                self._pending[rid] = _merge(dict(fields), self._pending.get(rid, {}))
            return False

    async def exists(self, request_id: str) -> bool:
        try:
            return bool(await self._client.exists(self.key(request_id)))
        except Exception as exc:
            log.warning("Redis unavailable checking %s: %s", request_id, exc)
            return False

    async def get(self, request_id: str) -> dict[str, str]:
        return await self._client.hgetall(self.key(request_id))


def _merge(into: dict[str, str], newer: dict[str, str]) -> dict[str, str]:
    """``into`` updated with ``newer``, except that a terminal state is never replaced by a
    later non-terminal one (a late ``decoding`` never overwrites ``finished``)."""
    if into.get("state") in TERMINAL and newer.get("state") not in (None, *TERMINAL):
        newer = {k: v for k, v in newer.items() if k != "state"}
    into.update(newer)
    return into


def now() -> float:
    return round(time.time(), 6)
