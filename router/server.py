"""The router process: the public ``cleave.v1.Inference`` gRPC server (DESIGN §3).

Lifecycle: :func:`serve_router` loads the tokenizer and model shape (no weights), connects
to Redis, starts the worker directory, binds the public server (with ``grpc.health.v1`` and
server reflection) and the OpenAI-compatible HTTP API with ``/metrics`` on ``http_port``
(``router.openai_api``, same event loop) and serves until SIGTERM/SIGINT. Health is SERVING while at least one
decode worker is registered (decode instances prefill themselves when no prefill worker is).

Per ``Generate`` call: :meth:`router.core.RouterCore.generate` (the one request lifecycle,
shared with the HTTP front door) yields the deltas; its errors become gRPC statuses here
(``common.errors.status_of``). Undecodable request bytes get INVALID_ARGUMENT
(``common.grpc_util.add_service``).

``GetModelInfo`` answers :meth:`RouterCore.model_info` filled further by the *views* the
caller passes to :func:`serve_router` (each an :data:`InfoView`, awaited in order); the
deployable router (``services.cli``) passes the MoE expert load and the published capacity
plan (``services.router_views``). The router itself imports nothing from ``services``.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cleave.v1 import inference_pb2, inference_pb2_grpc
from common.config import RouterConfig
from common.errors import CleaveError, abort_with
from common.grpc_util import add_service
from common.registry import connect_redis
from engine.source import load_model_config, load_tokenizer, resolve_model
from router.core import RouterCore
from router.openai_api import start_http
from router.readahead import Readahead
from router.text import TextCodec

log = logging.getLogger(__name__)

# Adds operator views to a ``GetModelInfo`` answer in place: awaited with (info, core) on
# every call; must not raise for a Redis outage (log and leave the fields empty instead).
InfoView = Callable[[inference_pb2.ModelInfo, RouterCore], Awaitable[None]]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """The gRPC front door: a thin adapter over :meth:`RouterCore.generate`, run through a
    bounded :class:`~router.readahead.Readahead` (a client that stops reading fails alone)."""

    def __init__(self, core: RouterCore, views: Sequence[InfoView] = ()) -> None:
        self.core = core
        self.views = tuple(views)

    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        pump = Readahead(self.core.generate(request, context.time_remaining()), self.core.cfg.stream_buffer)
        # the call's end (the client left, or its deadline) ends the request at once, whatever
        # this handler is waiting on (tests/router/test_stream_semantics.py)
        context.add_done_callback(lambda _: pump.cancel())
        try:
            while (msg := await pump.next()) is not None:
                yield msg
        except CleaveError as exc:
            if context.cancelled():  # the client left first; nobody reads the status
                raise asyncio.CancelledError() from exc
            await abort_with(context, exc)
        finally:
            await pump.close()       # the client left (or the call ended): the request is cancelled

    async def GetModelInfo(self, request, context) -> inference_pb2.ModelInfo:
        info = self.core.model_info()
        for view in self.views:
            await view(info, self.core)
        return info


async def _track_health(core: RouterCore, servicer) -> None:
    """Health follows the decode pool (SERVING once it has a worker: decode instances prefill
    themselves when the prefill pool is empty, ``--prefill-instances 0``); the router's queue
    is published for the planner on the same beat."""
    serving = None
    while True:
        await core.metrics.publish(waiting_for_kv=core.queued, active=len(core.active))
        ok = bool(core.directory.registered("decode"))
        if ok != serving:
            serving = ok
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", "cleave.v1.Inference"):
                await servicer.set(name, status)
        await asyncio.sleep(core.cfg.discovery_s)


async def build_router(cfg: RouterConfig, views: Sequence[InfoView] = ()):
    """Load the tokenizer and model shape, start discovery, bind the gRPC server (its
    ``GetModelInfo`` filled by ``views``) and the OpenAI-compatible HTTP API
    (``router.openai_api``); returns (grpc server, core, grpc port, http server)."""
    source = resolve_model(cfg.model)
    model, tokenizer = await asyncio.to_thread(lambda: (load_model_config(source), load_tokenizer(source)))
    client = connect_redis(cfg.redis_url)
    await client.ping()
    codec = TextCodec(tokenizer)
    await asyncio.to_thread(lambda: codec.max_token_chars)  # computed once, off the event loop
    core = RouterCore(cfg, source.model_id, model, codec, client)
    await core.start()
    server = grpc.aio.server()
    add_service(server, InferenceServicer(core, views), inference_pb2.DESCRIPTOR.services_by_name["Inference"])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise RuntimeError(f"could not bind the router to {cfg.host}:{cfg.port} (in use?)")
    await server.start()
    # "liveness" answers SERVING while the process runs (Kubernetes liveness probes); "" and
    # the Inference service follow the pools (readiness)
    await health_servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    core.background(asyncio.get_running_loop().create_task(_track_health(core, health_servicer)))
    try:
        http = await start_http(core, cfg.host, cfg.http_port)
    except BaseException:
        await server.stop(grace=None)
        await core.close()
        raise
    return server, core, port, http


async def serve_router(cfg: RouterConfig, ready=None, views: Sequence[InfoView] = ()) -> None:
    """Run the router until SIGTERM/SIGINT; ``ready(address)`` is called once it listens,
    ``views`` fill ``GetModelInfo`` (see :data:`InfoView`)."""
    server, core, port, http = await build_router(cfg, views)
    log.info("router listening on %s:%d (gRPC) and http://%s:%d/v1 (OpenAI API, /metrics)", cfg.host, port,
             cfg.host, http.port)
    if ready is not None:
        ready(f"{cfg.host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await http.stop()
    await server.stop(grace=5)
    await core.close()
