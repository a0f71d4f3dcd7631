"""The router's view of the pools: worker records from Redis plus a gRPC channel per worker.

:class:`WorkerDirectory` re-reads the registry every ``interval`` seconds and keeps one
handle (record, channel, in-flight counters) per worker incarnation ``(address, incarnation)``.

* A record that goes missing takes its worker out of routing for new requests and nothing
  else: the handle and its channel stay, so calls in flight go on (a Redis restart or a
  heartbeat that misses its TTL empties the registry for a moment). The record coming back
  puts the worker back. The channel is closed only when the worker is gone for good: a new
  incarnation of it registered (it restarted), or it stayed absent for ``grace_s`` with no
  call of this router in flight.
* A call that finds a worker unreachable (:func:`unreachable`) marks it: the worker is skipped
  for new work with a growing backoff until its record shows a new incarnation or, after the
  backoff, it answers again (:meth:`WorkerDirectory.answered`).
* Warnings about one worker are rate limited (:meth:`WorkerDirectory.warn`): one line per
  worker per interval, with how many were held back.

It also counts what this router has sent each worker since the worker's last heartbeat, so
a burst of requests does not all land on the worker that looked idlest a moment ago.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import redis.asyncio as aioredis

from cleave.v1 import worker_pb2_grpc
from common.errors import answered_as
from common.grpc_util import internal_channel
from common.registry import WorkerRecord, read_workers

log = logging.getLogger(__name__)

BACKOFF_S = (0.25, 5.0)  # first and longest skip of an unreachable worker


@dataclass
class WorkerHandle:
    record: WorkerRecord
    channel: grpc.aio.Channel
    stub: object
    inflight: int = 0            # requests this router has in progress on the worker
    inflight_tokens: int = 0     # prompt tokens (prefill) / reserved tokens (decode) in progress
    absent_since: float | None = None   # monotonic time its record went missing (None: registered)
    skip_until: float = 0.0      # monotonic: skipped for new work until then (unreachable)
    unreachable: int = 0         # consecutive calls that found it unreachable
    calls: int = 0               # streaming calls of this router open on it now

    @property
    def key(self) -> str:
        return f"{self.record.pool}/{self.record.worker_id}"

    @property
    def ident(self) -> tuple[str, str]:
        """This incarnation of the worker (a restart is another one)."""
        return self.record.address, self.record.incarnation


_STUBS = {"prefill": worker_pb2_grpc.PrefillStub, "decode": worker_pb2_grpc.DecodeStub}


def unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached a live worker process: ``UNAVAILABLE`` without the
    mark every Cleave servicer puts on the statuses it sends (``common.errors.abort_with``)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and answered_as(exc) is None


class WorkerDirectory:
    """``caller``: this router's identity, sent with every call (workers bound reservations per
    caller); ``grace_s``: how long an absent worker's channel is kept with nothing in flight."""

    def __init__(self, client: aioredis.Redis, prefix: str, interval: float, token: str = "",
                 caller: str = "", grace_s: float = 30.0, warn_interval_s: float = 10.0) -> None:
        self._client = client
        self._token = token          # the internal APIs' shared secret, sent with every call
        self._caller = caller
        self._prefix = prefix
        self._interval = interval
        self._grace_s = grace_s
        self._workers: dict[tuple[str, str], WorkerHandle] = {}  # (address, incarnation) -> handle
        self._task: asyncio.Task | None = None
        self._warned: dict[str, tuple[float, int]] = {}  # key -> (last line's time, lines held back)
        self._warn_interval_s = warn_interval_s
        self.changed = asyncio.Event()
        self.on_refresh: Callable[[list[WorkerRecord]], None] | None = None   # each registry read (KV index)

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
                self.warn("registry", "reading the worker registry failed: %s", exc)

    async def refresh(self) -> None:
        records = [r for r in await read_workers(self._client, self._prefix) if r.pool in _STUBS]
        if self.on_refresh is not None:
            try:
                self.on_refresh(records)
            except Exception:   # the index's trouble must not stop discovery
                log.exception("the KV index's registry update failed")
        now = time.monotonic()
        live = {(r.address, r.incarnation): r for r in records}
        current = {(r.pool, r.worker_id): r.incarnation for r in records}
        for key, rec in live.items():
            handle = self._workers.get(key)
            if handle is None:
                channel = internal_channel(rec.address, self._token, caller=self._caller,
                                           options=[("grpc.max_receive_message_length", 64 << 20)])
                self._workers[key] = WorkerHandle(rec, channel, _STUBS[rec.pool](channel))
                log.info("worker joined: %s %s at %s", rec.pool, rec.worker_id, rec.address)
                self.changed.set()
                continue
            if handle.absent_since is not None:
                log.info("worker %s is registered again", handle.key)
                self.changed.set()
            handle.record, handle.absent_since = rec, None
        for key, handle in list(self._workers.items()):
            if key in live:
                continue
            restarted = current.get((handle.record.pool, handle.record.worker_id), handle.record.incarnation) \
                != handle.record.incarnation or any(a == key[0] for a, _ in live)
            if handle.absent_since is None:
                handle.absent_since = now
                self.changed.set()
                if not restarted:
                    log.info("worker %s is missing from the registry: no new requests go to it; calls in "
                             "flight go on", handle.key)
            idle = handle.inflight == 0 and handle.calls == 0
            if restarted or (idle and now - handle.absent_since >= self._grace_s):
                del self._workers[key]
                log.info("worker left: %s at %s (%s)", handle.key, key[0],
                         "a new incarnation replaced it" if restarted else f"absent for {self._grace_s:.0f} s")
                await handle.channel.close()

    def pool(self, name: str) -> list[WorkerHandle]:
        """The workers of ``name`` that take new requests: registered, not draining (draining
        ones keep their channels for the streams they are finishing) and not being skipped as
        unreachable."""
        now = time.monotonic()
        return [h for h in self._workers.values() if h.record.pool == name and not h.record.draining
                and h.absent_since is None and h.skip_until <= now]

    def registered(self, name: str) -> list[WorkerHandle]:
        """The workers of ``name`` whose records are in the registry now (health, model info)."""
        return [h for h in self._workers.values() if h.record.pool == name and h.absent_since is None]

    def failed_to_reach(self, handle: WorkerHandle, what: str) -> None:
        """A call to ``handle`` found no live worker: skip it with backoff (see the module doc)."""
        handle.unreachable += 1
        first, most = BACKOFF_S
        wait = min(most, first * 2 ** (handle.unreachable - 1))
        handle.skip_until = time.monotonic() + wait
        self.warn(handle.key, "%s: %s unreachable (%s); skipped for %.2f s", what, handle.key,
                  handle.record.address, wait)

    def answered(self, handle: WorkerHandle) -> None:
        """A call to ``handle`` reached it: it is routable again at once."""
        handle.unreachable, handle.skip_until = 0, 0.0

    def warn(self, key: str, fmt: str, *args) -> None:
        """``log.warning(fmt, *args)`` at most once per ``warn_interval_s`` per ``key``; the next
        line says how many were held back meanwhile."""
        now = time.monotonic()
        last, held = self._warned.get(key, (float("-inf"), 0))
        if now - last < self._warn_interval_s:
            self._warned[key] = (last, held + 1)
            return
        self._warned[key] = (now, 0)
        log.warning(fmt + (f" ({held} more like this in the last {self._warn_interval_s:.0f} s)" if held else ""),
                    *args)
