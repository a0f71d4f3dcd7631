"""What prefill and decode instances share: model, KV cache, allocator, transport, gRPC server, heartbeat.

Lifecycle of a worker process (``cleave worker prefill|decode``):

1. :class:`WorkerHost` builds the instance's executor (``engine.runtime``: its ranks, their
   model shards, KV caches and transports, on this host or joined from others) and the block
   manager (``engine.block_manager``: the one owner of the block ids, valid on all its ranks,
   and its prefix cache).
2. :func:`serve_worker` starts it (:func:`start_worker`: builds the pool's servicer on the
   host, binds the gRPC server (port 0 = a free port), serves Prometheus ``/metrics`` on
   ``metrics_port`` when set (``common.prom.WorkerMetrics``), starts the Redis heartbeat so
   routers find it, and the KV event publisher (``services.kv_events``) so they know what its
   prefix cache holds) and waits. In-process test stacks (``tests/fake_stack.py``) call
   :func:`start_worker` and :meth:`RunningWorker.stop` themselves.
3. SIGTERM/SIGINT drains: health turns NOT_SERVING and the record is rewritten as
   ``draining`` at once, so routers send nothing new (a request that raced the flag is
   refused with UNAVAILABLE and the router retries it elsewhere). Requests already here run
   to completion, for up to ``drain_timeout_s``; then the record is deleted, the server stops
   (what is still running is cancelled and the router re-runs it on another instance) and the
   instance's ranks stop. A rank that dies stops the process at once, without draining,
   after reporting NOT_SERVING, and the process exits with code 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cleave.v1 import inference_pb2, worker_pb2
from common.errors import Unavailable
from common.prom import WorkerMetrics, layout_label
from common.registry import Heartbeat, WorkerRecord, connect_redis
from common.kv_hash import chain_root
from engine.block_manager import BlockManager
from engine.runtime.executor import Executor, make_executor
from engine.runtime.fake import fake_engine_executor
from services.config import WorkerConfig
from services.kv_events import KvEventPublisher

log = logging.getLogger(__name__)


def logprob_pb(entry) -> inference_pb2.TokenLogprob:
    """The wire form of an ``engine.logprobs.TokenLogprob`` (prefill and decode send them)."""
    msg = inference_pb2.TokenLogprob(token_id=entry.token_id,
                                     top=[inference_pb2.TopLogprob(token_id=t, logprob=v) for t, v in entry.top])
    if entry.logprob is not None:
        msg.logprob = entry.logprob
    return msg


def landing_rank_pb(rank) -> worker_pb2.LandingRank:
    """The wire form of an executor's ``RankEndpoint`` (decode landing descriptors carry them)."""
    return worker_pb2.LandingRank(rank=rank.rank, tp_rank=rank.tp_rank, pp_rank=rank.pp_rank,
                                  transport_address=rank.transport_address, layers=list(rank.layers),
                                  kv_heads=list(rank.kv_heads))


class WorkerHost:
    """The engine state of one instance (an ``engine.runtime`` executor), shared by its
    servicer and heartbeat. ``make``: how to build it from a ``RuntimeConfig`` (tests pass
    ``engine.runtime.fake.FakeExecutor``; default ``make_executor``, or the fake engine with
    ``--fake-engine``)."""

    def __init__(self, cfg: WorkerConfig, make: Callable[..., Executor] | None = None) -> None:
        self.cfg = cfg
        if make is None:
            make = fake_engine_executor if cfg.runtime.fake_engine else make_executor
        self.failed: str | None = None            # set when a rank died: the service stops
        self.on_failure: Callable[[str], None] = lambda msg: None
        self.executor = make(cfg.runtime, on_failure=self._rank_failed)
        self.source = self.executor.source
        self.model_id = self.source.model_id
        self.model_config = self.executor.model_config
        self.compat = self.executor.compat
        rt = cfg.runtime
        cache = rt.prefix_cache and rt.parallel.cp == 1
        if rt.prefix_cache and not cache:
            log.info("prefix cache off: each rank of a context-parallel instance holds only its chunks of a "
                     "prompt, so every prompt is prefilled whole")
        self.blocks = BlockManager(self.executor.num_blocks, rt.block_size,
                                   chain_root(self.compat, self.executor.layout), prefix_cache=cache)
        self.incarnation = uuid.uuid4().hex
        p = self.executor.layout
        self.layout = inference_pb2.Layout(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)   # the wire form
        self.address = ""  # host:port, set once the server is bound
        self.health = None  # the gRPC health servicer, set once the server is bound
        self.load_fn: Callable[[], dict] = lambda: {}
        self.draining = False  # set when asked to stop: no new requests are accepted
        self.metrics = WorkerMetrics(cfg.pool, lambda: self.worker_id, layout_label(self.layout))
        self.metrics.gauges.add("cleave_kv_cache_usage_perc", "Share of the KV blocks held by requests (0..1; "
                                "cached blocks nobody holds are not counted)",
                                lambda: self.blocks.used_blocks / self.blocks.total)
        self.metrics.gauges.add("cleave_kv_cached_blocks", "KV blocks kept only for their cached prefix "
                                "(evicted when room is needed)", lambda: self.blocks.cached_blocks)

    def check_accepting(self) -> None:
        """Raise UNAVAILABLE when draining; servicers call it before taking a new request."""
        if self.draining:
            raise Unavailable(f"{self.cfg.pool} worker {self.worker_id} is draining (shutting down); "
                              f"retry on another instance")

    def _rank_failed(self, message: str) -> None:
        self.failed = message
        self.on_failure(message)

    @property
    def worker_id(self) -> str:
        return self.cfg.worker_id or f"{self.cfg.pool}-{self.address.replace(':', '-')}"

    def forward(self, batch) -> torch.Tensor:
        return self.executor.forward(batch)

    def info(self, running: int, waiting: int, queued_tokens: int = 0) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, pool=self.cfg.pool, incarnation=self.incarnation,
            model_id=self.model_id, layout=self.layout, total_blocks=self.blocks.total,
            free_blocks=self.blocks.available_blocks, block_size=self.cfg.runtime.block_size,
            running=running, waiting=waiting, queued_tokens=queued_tokens, compat_hash=self.compat,
            cached_blocks=self.blocks.cached_blocks)

    def record(self) -> WorkerRecord:
        info = self.load_fn()
        return WorkerRecord(
            pool=self.cfg.pool, worker_id=self.worker_id, address=self.address,
            incarnation=self.incarnation, model_id=self.model_id, compat_hash=self.compat,
            host=socket.gethostname(), pid=os.getpid(),
            layout={"tp": self.layout.tp, "pp": self.layout.pp, "cp": self.layout.cp, "ep": self.layout.ep},
            capacity={"total_blocks": self.blocks.total, "block_size": self.cfg.runtime.block_size},
            load={"free_blocks": info.free_blocks, "running": info.running, "waiting": info.waiting,
                  "queued_tokens": info.queued_tokens, "cached_blocks": info.cached_blocks},
            draining=self.draining)


async def start_worker_server(host: WorkerHost, add_servicer: Callable[[grpc.aio.Server], None],
                              ) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server of a worker; returns (server, bound port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    add_servicer(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{host.cfg.runtime.host}:{host.cfg.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {host.cfg.runtime.host}:{host.cfg.port}")
    host.address = f"{host.cfg.runtime.host}:{port}"
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    host.health = health_servicer
    return server, port


class RunningWorker:
    """A worker whose gRPC server, servicer, metrics and heartbeat run (:func:`start_worker`);
    :meth:`stop` takes them down in order. ``heartbeat`` is None without a Redis URL."""

    def __init__(self, host: WorkerHost, servicer, server: grpc.aio.Server, client=None,
                 heartbeat: Heartbeat | None = None, beat_task: asyncio.Task | None = None,
                 kv_events: KvEventPublisher | None = None, kv_task: asyncio.Task | None = None,
                 events_client=None) -> None:
        self.host, self.servicer, self.server = host, servicer, server
        self.heartbeat = heartbeat
        self.kv_events = kv_events   # the KV event publisher (services.kv_events), None when off
        self._client, self._beat_task, self._kv_task = client, beat_task, kv_task
        self._events_client = events_client   # the publisher's own: its timeouts never touch the heartbeat

    async def stop(self, grace: float | None = 5.0) -> None:
        """Leave the registry (the last KV events published, the KV snapshot deleted), stop the
        server (``grace`` seconds for running calls), the servicer, metrics and the instance's ranks."""
        if self._beat_task is not None:
            self._beat_task.cancel()
            if self._kv_task is not None:
                self._kv_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._kv_task
            await self.heartbeat.deregister()  # leave the routing set first
            if self.kv_events is not None:
                await self.kv_events.close()   # last events out, snapshot deleted (never raises)
                await self._events_client.aclose()
            await self._client.aclose()
        streams = getattr(self.servicer, "streams", None)   # long-lived Tokens streams (DecodeService)
        if streams is not None:
            streams.close()         # they would hold the server's stop for its whole grace
        await self.server.stop(grace=grace)
        await self.servicer.stop()
        self.host.metrics.close()
        self.host.executor.close()


async def start_worker(host: WorkerHost, make_servicer: Callable[[WorkerHost], object],
                       add_fn: Callable) -> RunningWorker:
    """Serve ``host``: build its servicer, bind and start the gRPC server, serve metrics when
    ``metrics_port`` is set and register in Redis when ``redis_url`` is (first beat written
    before returning). Called by :func:`serve_worker` and by in-process test stacks."""
    cfg = host.cfg
    servicer = make_servicer(host)
    server, _ = await start_worker_server(host, lambda s: add_fn(servicer, s))
    await servicer.start()
    if cfg.metrics_port:
        port = host.metrics.serve(cfg.runtime.host, cfg.metrics_port)
        log.info("%s worker metrics on http://%s:%d/metrics", cfg.pool, cfg.runtime.host, port)
    if not cfg.redis_url:
        return RunningWorker(host, servicer, server)
    client = connect_redis(cfg.redis_url)
    heartbeat = Heartbeat(client, cfg.key_prefix, host.record, cfg.heartbeat_s, cfg.ttl_s)
    await heartbeat.beat()
    kv_events = kv_task = events_client = None
    if cfg.kv_events:   # a client of its own: a publisher call cut by its timeout never stalls the heartbeat
        events_client = connect_redis(cfg.redis_url)
        kv_events = KvEventPublisher(events_client, cfg.key_prefix, cfg.pool, host.worker_id, host.incarnation,
                                     host.blocks, host.metrics, snapshot_s=cfg.kv_snapshot_interval_s)
        await kv_events.start()   # the first snapshot (s = 0), before any event entry
        kv_task = asyncio.create_task(kv_events.run())
    return RunningWorker(host, servicer, server, client, heartbeat, asyncio.create_task(heartbeat.run()),
                         kv_events, kv_task, events_client)


async def serve_worker(cfg: WorkerConfig, make_servicer: Callable[[WorkerHost], object],
                       add_fn: Callable, ready: Callable[[str], None] | None = None) -> None:
    """Run one worker process until SIGTERM/SIGINT or a rank dies (see the module docstring)."""
    host = await asyncio.to_thread(WorkerHost, cfg)
    worker = await start_worker(host, make_servicer, add_fn)
    log.info("%s worker %s serving %s on %s", cfg.pool, host.worker_id, host.model_id, host.address)
    if ready is not None:
        ready(host.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host.on_failure = lambda msg: loop.call_soon_threadsafe(stop.set)
    await stop.wait()
    await host.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    if host.failed:
        log.error("%s worker %s is going down: %s", cfg.pool, host.worker_id, host.failed)
    else:
        await _drain(host, worker.servicer, worker.heartbeat, stop)
    log.info("%s worker %s stopping", cfg.pool, host.worker_id)
    await worker.stop(grace=5)
    if host.failed:
        raise SystemExit(1)


async def _drain(host: WorkerHost, servicer, heartbeat: Heartbeat | None, stop: asyncio.Event) -> None:
    """Stop taking requests, tell routers at once, and wait for the ones here to finish."""
    host.draining = True
    if heartbeat is not None:
        try:
            await heartbeat.beat()  # the record now says draining: routers stop sending work
        except Exception as exc:
            log.warning("could not mark %s draining in Redis: %s", host.worker_id, exc)
    stop.clear()  # a second SIGTERM/SIGINT cuts the drain short
    deadline = time.monotonic() + host.cfg.drain_timeout_s
    busy = servicer.busy()
    log.info("%s worker %s draining: %d request(s) in progress (up to %.0f s)", host.cfg.pool,
             host.worker_id, busy, host.cfg.drain_timeout_s)
    while busy and time.monotonic() < deadline and not stop.is_set() and not host.failed:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
        busy = servicer.busy()
    if busy:
        log.warning("%s worker %s stops with %d request(s) unfinished; routers retry them elsewhere",
                    host.cfg.pool, host.worker_id, busy)
