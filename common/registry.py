"""Worker registry in Redis: ``<prefix>worker:<pool>:<worker_id>`` hashes with a TTL (DESIGN §7).

Workers run :class:`Heartbeat` (write their record every ``interval`` seconds, expiring after
``ttl``); the router and the planner read every record with :func:`read_workers`. A worker that
misses its heartbeats disappears from routing when its record expires. One that stops cleanly
first marks its record ``draining`` (routers send it nothing new but keep its streams), then
deletes it once its requests are done.
"""
from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)


def worker_key(prefix: str, pool: str, worker_id: str) -> str:
    return f"{prefix}worker:{pool}:{worker_id}"


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as the router sees it."""

    pool: str
    worker_id: str
    address: str                 # host:port of its gRPC server
    incarnation: str
    layout: dict                 # {"tp":..,"pp":..,"cp":..,"ep":..}
    capacity: dict               # {"total_blocks":.., "block_size":..}
    load: dict                   # {"free_blocks", "running", "waiting", "queued_tokens", "cached_blocks"}
    model_id: str = ""
    compat_hash: str = ""
    host: str = ""               # machine name and process id, for operators
    pid: int = 0
    draining: bool = False       # stopping: finishes what it has, takes no new requests

    def to_hash(self) -> dict[str, str]:
        return {"address": self.address, "incarnation": self.incarnation, "pool": self.pool,
                "worker_id": self.worker_id, "layout": json.dumps(self.layout),
                "capacity": json.dumps(self.capacity), "load": json.dumps(self.load),
                "model_id": self.model_id, "compat_hash": self.compat_hash, "host": self.host,
                "pid": str(self.pid), "draining": "1" if self.draining else "0"}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "WorkerRecord":
        return cls(pool=h["pool"], worker_id=h["worker_id"], address=h["address"],
                   incarnation=h["incarnation"], layout=json.loads(h.get("layout", "{}")),
                   capacity=json.loads(h.get("capacity", "{}")), load=json.loads(h.get("load", "{}")),
                   model_id=h.get("model_id", ""), compat_hash=h.get("compat_hash", ""),
                   host=h.get("host", ""), pid=int(h.get("pid", 0) or 0),
                   draining=h.get("draining", "0") == "1")


class Heartbeat:
    """Keeps one worker's record alive in Redis. Owned by the worker's service process."""

    def __init__(self, client: aioredis.Redis, prefix: str, record_fn: Callable[[], WorkerRecord],
                 interval: float, ttl: float) -> None:
        self._client = client
        self._prefix = prefix
        self._record_fn = record_fn
        self._interval = interval
        self._ttl_ms = int(ttl * 1000)
        self._key: str | None = None

    async def beat(self) -> None:
        rec = self._record_fn()
        self._key = worker_key(self._prefix, rec.pool, rec.worker_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key, mapping=rec.to_hash())
            pipe.pexpire(self._key, self._ttl_ms)
            await pipe.execute()

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:  # Redis down: keep serving, retry next beat
                log.warning("heartbeat to Redis failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def deregister(self) -> None:
        if self._key is not None:
            await self._client.delete(self._key)


def split_password(url: str) -> tuple[str, str]:
    """(``url`` without its password, the password or "") — to pass the password by environment."""
    if not url:
        return url, ""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url, ""
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{user}@" if user else "") + host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), urllib.parse.unquote(parts.password)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and printed lines."""
    bare, password = split_password(url)
    if not password:
        return url
    parts = urllib.parse.urlsplit(bare)
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{parts.netloc.split('@')[-1]}"))


def connect_redis(url: str, asynchronous: bool = True):
    """A Redis client for ``url`` (decoded responses), with the password from
    ``CLEAVE_REDIS_PASSWORD`` when that is set and the URL carries none."""
    from common.environment import Environment
    password = Environment.read().redis_password or None
    # bounded waits: a frozen Redis (SIGSTOP, a partition) fails a command in seconds
    kw = dict(decode_responses=True, password=password, socket_timeout=5.0, socket_connect_timeout=5.0,
              health_check_interval=30)
    if asynchronous:
        return aioredis.from_url(url, **kw)
    import redis
    return redis.Redis.from_url(url, **kw)


async def read_workers(client: aioredis.Redis, prefix: str, pool: str | None = None) -> list[WorkerRecord]:
    """Every live worker record (of ``pool`` when given)."""
    pattern = worker_key(prefix, pool or "*", "*")
    keys = [k async for k in client.scan_iter(match=pattern, count=500)]
    if not keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.hgetall(k)
        hashes = await pipe.execute()
    records = []
    for h in hashes:
        if h and "address" in h:
            try:
                records.append(WorkerRecord.from_hash(h))
            except (KeyError, ValueError) as exc:
                log.warning("ignoring malformed worker record %s: %s", h, exc)
    return sorted(records, key=lambda r: (r.pool, r.worker_id))
