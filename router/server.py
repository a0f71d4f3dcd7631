"""The router process: the public ``cleave.v1.Inference`` gRPC server (DESIGN §3).

Lifecycle: :func:`serve_router` loads the tokenizer and model shape (no weights), connects
to Redis, starts the worker directory, binds the public server (with ``grpc.health.v1`` and
server reflection) and serves until SIGTERM/SIGINT. Health is SERVING while at least one
prefill and one decode worker are registered.

Per ``Generate`` call: validate and tokenize (``router.validate``), record ``queued`` in
Redis, run the request (``router.lifecycle.RequestRun``), stream token and text deltas, and
record the terminal state, whatever ends the call.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cleave.v1 import inference_pb2, inference_pb2_grpc
from engine.config import ModelConfig
from engine.loader import load_model_config, load_tokenizer, resolve_model
from router.lifecycle import RequestRun, ValidRequest
from router.policy import make_policy
from router.state import RequestStore, now
from router.text import IncrementalText, TextCodec
from router.validate import check_sampling, prompt_ids_of, request_id_of, seed_of
from router.workers import WorkerDirectory
from services.config import RouterConfig
from services.errors import CleaveError, InvalidRequest, status_of
from services.metrics import MetricsWriter
from services.registry import connect_redis

log = logging.getLogger(__name__)


class RouterCore:
    """Everything requests share: config, tokenizer, model shape, workers, policy, Redis state."""

    def __init__(self, cfg: RouterConfig, model_id: str, model: ModelConfig, codec: TextCodec,
                 client: aioredis.Redis) -> None:
        self.cfg = cfg
        self.model_id = model_id
        self.model = model
        self.codec = codec
        self.client = client
        self.directory = WorkerDirectory(client, cfg.key_prefix, cfg.discovery_s)
        self.policy = make_policy("least-load")
        self.store = RequestStore(client, cfg.key_prefix, cfg.request_ttl_s)
        self.metrics = MetricsWriter(client, cfg.key_prefix, uuid.uuid4().hex[:12])
        self.queued = 0                   # requests waiting for decode room
        self.active: set[str] = set()     # request ids in flight on this router
        self._tasks: set[asyncio.Task] = set()

    def background(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        core = self.core
        try:
            rid = request_id_of(request)
            if rid in core.active:
                raise InvalidRequest(f"request_id {rid!r} is already in progress; use a unique id")
            ids = prompt_ids_of(request, core.codec, core.model)
            check_sampling(request.sampling, len(ids), core.model)
        except CleaveError as exc:
            await context.abort(*status_of(exc))
            return
        remaining = context.time_remaining()
        timeout = core.cfg.request_timeout_s if remaining is None else min(remaining, core.cfg.request_timeout_s)
        loop_now = now()
        req = ValidRequest(rid, ids, request.sampling, seed_of(request.sampling), loop_now + timeout,
                           list(core.model.eos_token_ids))
        core.active.add(rid)
        await core.store.update(rid, state="queued", prompt_tokens=len(ids), completion_tokens=0,
                                max_tokens=request.sampling.max_tokens, t_arrival=loop_now,
                                attempts=0, error="", finish_reason="")
        text = IncrementalText(core.codec, list(request.sampling.stop))
        run = RequestRun(core, req)
        state, error, finish, count = "failed", "", None, 0
        try:
            async with asyncio.timeout(timeout), contextlib.aclosing(run.tokens()) as stream:
                async for new_ids, reason in stream:
                    if count == 0:
                        t_first = now()
                        await core.store.update(rid, t_first_token=t_first)
                        await core.metrics.sample("ttft", rid, t_first - loop_now)
                    count += len(new_ids)
                    delta = text.add(new_ids, final=reason is not None)
                    if text.stopped:
                        reason = inference_pb2.FINISH_REASON_STOP
                    msg = inference_pb2.GenerateResponse(request_id=rid, token_ids=new_ids, text=delta)
                    if reason is not None:
                        finish = reason
                        msg.finish_reason = reason
                        msg.usage.prompt_tokens = len(ids)
                        msg.usage.completion_tokens = count
                    yield msg
                    if reason is not None:
                        break
            state = "finished"
            if count > 1:
                await core.metrics.sample("tpot", rid, (now() - t_first) / (count - 1))
        except (asyncio.CancelledError, GeneratorExit):  # gRPC cancels the task or closes the stream
            state, error = "cancelled", "client cancelled the request"
            raise
        except TimeoutError:
            state, error = "failed", f"deadline of {timeout:.1f} s exceeded"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {rid} did not finish within its deadline of {timeout:.1f} s")
        except Exception as exc:
            code, message = status_of(exc)
            state, error = "failed", message
            if context.cancelled():  # the client left first: whatever surfaced, it cancelled
                state, error = "cancelled", "client cancelled the request"
                raise asyncio.CancelledError() from exc
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request %s failed", rid)
            await context.abort(code, message)
        finally:
            core.active.discard(rid)
            fields = dict(state=state, completion_tokens=count, t_finish=now(), attempts=run.attempts,
                          error=error)
            if finish is not None:
                fields["finish_reason"] = inference_pb2.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
            core.background(asyncio.get_running_loop().create_task(core.store.update(rid, **fields)))

    async def GetModelInfo(self, request, context) -> inference_pb2.ModelInfo:
        core, m = self.core, self.core.model
        pools = []
        for name in ("prefill", "decode"):
            workers = core.directory.pool(name)
            layout = workers[0].record.layout if workers else {"tp": 1, "pp": 1, "cp": 1, "ep": 1}
            pools.append(inference_pb2.PoolInfo(pool=name, instances=len(workers),
                                                layout=inference_pb2.Layout(**{k: int(v) for k, v in layout.items()})))
        block_size = next((w.record.capacity.get("block_size", 0) for w in core.directory.pool("decode")), 0)
        return inference_pb2.ModelInfo(
            model_id=core.model_id, architecture=m.architecture, vocab_size=m.vocab_size,
            max_context_length=m.max_position, eos_token_ids=list(m.eos_token_ids),
            has_chat_template=core.codec.has_chat_template, pools=pools, dtype=m.dtype,
            kv_block_size=block_size)


async def _track_health(core: RouterCore, servicer) -> None:
    """Health follows the pools (SERVING once each has a worker); the router's queue is
    published for the planner on the same beat."""
    serving = None
    while True:
        await core.metrics.publish(waiting_for_kv=core.queued, active=len(core.active))
        ok = bool(core.directory.pool("prefill")) and bool(core.directory.pool("decode"))
        if ok != serving:
            serving = ok
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", "cleave.v1.Inference"):
                await servicer.set(name, status)
        await asyncio.sleep(core.cfg.discovery_s)


async def build_router(cfg: RouterConfig):
    """Load the tokenizer and model shape, start discovery, bind the server; returns (server, core, port)."""
    source = resolve_model(cfg.model)
    model, tokenizer = await asyncio.to_thread(lambda: (load_model_config(source), load_tokenizer(source)))
    client = connect_redis(cfg.redis_url)
    await client.ping()
    core = RouterCore(cfg, source.model_id, model, TextCodec(tokenizer), client)
    await core.directory.start()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core), server)
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
    return server, core, port


async def serve_router(cfg: RouterConfig, ready=None) -> None:
    server, core, port = await build_router(cfg)
    log.info("router listening on %s:%d", cfg.host, port)
    if ready is not None:
        ready(f"{cfg.host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    await core.directory.stop()
    await core.client.aclose()
