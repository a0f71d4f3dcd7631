"""Request state in Redis: ``<prefix>req:<request_id>`` hashes (DESIGN §7).

The router writes one hash per request as it moves through
``queued → prefilling → transferring → decoding → finished | failed | cancelled`` and sets
it to expire ``ttl`` seconds after the terminal state. Writes are best effort: a Redis
outage is logged and never fails a request that is otherwise being served.
"""
from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

TERMINAL = ("finished", "failed", "cancelled")
STATES = ("queued", "prefilling", "transferring", "decoding") + TERMINAL


class RequestStore:
    """Owned by the router; one instance shared by all requests."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s

    def key(self, request_id: str) -> str:
        return f"{self._prefix}req:{request_id}"

    async def exists(self, request_id: str) -> bool:
        try:
            return bool(await self._client.exists(self.key(request_id)))
        except Exception as exc:
            log.warning("Redis unavailable checking %s: %s", request_id, exc)
            return False

    async def update(self, request_id: str, **fields) -> None:
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown request state {state!r}")
        mapping = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self.key(request_id), mapping=mapping)
                if state in TERMINAL:
                    pipe.expire(self.key(request_id), self._ttl_s)
                await pipe.execute()
        except Exception as exc:
            log.warning("could not record %s for request %s: %s", fields, request_id, exc)

    async def get(self, request_id: str) -> dict[str, str]:
        return await self._client.hgetall(self.key(request_id))


def now() -> float:
    return round(time.time(), 6)
