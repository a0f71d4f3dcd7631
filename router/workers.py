"""The router's view of the pools: worker records from Redis plus a gRPC channel per worker.

:class:`WorkerDirectory` re-reads the registry every ``interval`` seconds (workers come and
go), keeps one channel per (address, incarnation) and closes channels of workers that left.
It also counts what this router has sent each worker since the worker's last heartbeat, so
a burst of requests does not all land on the worker that looked idlest a moment ago.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis

from cleave.v1 import worker_pb2_grpc
from common.grpc_util import internal_channel
from common.registry import WorkerRecord, read_workers

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    record: WorkerRecord
    channel: grpc.aio.Channel
    stub: object
    inflight: int = 0            # requests this router has in progress on the worker
    inflight_tokens: int = 0     # prompt tokens (prefill) / reserved tokens (decode) in progress
    failures: int = field(default=0)

    @property
    def key(self) -> str:
        return f"{self.record.pool}/{self.record.worker_id}"


_STUBS = {"prefill": worker_pb2_grpc.PrefillStub, "decode": worker_pb2_grpc.DecodeStub}


class WorkerDirectory:
    def __init__(self, client: aioredis.Redis, prefix: str, interval: float, token: str = "") -> None:
        self._client = client
        self._token = token          # the internal APIs' shared secret, sent with every call
        self._prefix = prefix
        self._interval = interval
        self._workers: dict[tuple[str, str], WorkerHandle] = {}  # (address, incarnation) -> handle
        self._task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for handle in self._workers.values():
            await handle.channel.close()
        self._workers.clear()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                async with asyncio.timeout(max(2.0, 4 * self._interval)):
                    await self.refresh()
            except (Exception, TimeoutError) as exc:  # Redis away: keep the last view
                log.warning("reading the worker registry failed: %s", exc)

    async def refresh(self) -> None:
        records = await read_workers(self._client, self._prefix)
        seen = set()
        for rec in records:
            if rec.pool not in _STUBS:
                continue
            key = (rec.address, rec.incarnation)
            seen.add(key)
            handle = self._workers.get(key)
            if handle is None:
                channel = internal_channel(rec.address, self._token,
                                           options=[("grpc.max_receive_message_length", 64 << 20)])
                self._workers[key] = WorkerHandle(rec, channel, _STUBS[rec.pool](channel))
                log.info("worker joined: %s %s at %s", rec.pool, rec.worker_id, rec.address)
                self.changed.set()
            else:
                handle.record = rec
        for key in [k for k in self._workers if k not in seen]:
            handle = self._workers.pop(key)
            log.info("worker left: %s at %s", handle.key, key[0])
            await handle.channel.close()
            self.changed.set()

    def pool(self, name: str) -> list[WorkerHandle]:
        """The workers of ``name`` that take new requests (draining ones keep their channels
        for the streams they are finishing, but get nothing new)."""
        return [h for h in self._workers.values() if h.record.pool == name and not h.record.draining]

    def drop(self, handle: WorkerHandle) -> None:
        """Forget a worker that failed an RPC until its next heartbeat brings it back."""
        self._workers.pop((handle.record.address, handle.record.incarnation), None)
