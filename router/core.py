"""The router's one request lifecycle, shared by every front door (gRPC today, HTTP beside it).

:class:`RouterCore` holds what requests share (config, tokenizer, model shape, worker
directory, routing policy, Redis state). A front door turns its wire request into a
``cleave.v1.GenerateRequest`` and iterates :meth:`RouterCore.generate`:

* it validates and tokenizes (cheap size checks first; tokenizing runs off the event loop),
  records ``queued``, runs the request (``router.lifecycle.RequestRun``: reserve, prefill,
  transfer, decode, with retries on other workers) and yields ``GenerateResponse`` deltas;
* it raises a :class:`common.errors.CleaveError` (before the first delta or mid-stream) for
  every failure; the front door maps it to its own status (``status_of`` for gRPC);
* closing the generator early (``aclose()``) or cancelling the caller's task means the client
  left: the request is recorded ``cancelled`` (or as a missed deadline when its deadline had
  passed), its worker calls are cancelled and its KV blocks freed.

Redis never sits on this path: state and latency samples are queued and written by
background tasks (``router.state.RequestStore``, ``common.metrics.MetricsWriter``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
import redis.asyncio as aioredis

from cleave.v1 import inference_pb2
from common.config import RouterConfig
from common.errors import CleaveError, DeadlineExceeded, InvalidRequest, error_for
from common.metrics import MetricsWriter
from common.model import ModelConfig
from common.prom import RouterMetrics
from router.kv_index import MODES as KV_INDEX_MODES, KvIndex
from router.lifecycle import RequestRun, ValidRequest
from router.policy import make_policy
from router.request_state import AdmissionQueue, RequestRecorder, RequestState
from router.state import RequestStore, now
from router.text import IncrementalText, TextCodec
from router.token_streams import TokenStreams
from router.validate import check_input_size, check_sampling, prompt_ids_of, request_id_of, seed_of
from router.workers import WorkerDirectory

log = logging.getLogger(__name__)

# a cancellation this close to the request's deadline is the deadline (gRPC cancels the call
# when the client's deadline passes, racing the router's own timer)
_DEADLINE_SLACK_S = 0.05


class RouterCore:
    """Everything requests share: config, tokenizer, model shape, workers, policy, Redis state."""

    def __init__(self, cfg: RouterConfig, model_id: str, model: ModelConfig, codec: TextCodec,
                 client: aioredis.Redis) -> None:
        self.cfg = cfg
        self.model_id = model_id
        self.model = model
        self.codec = codec
        self.client = client
        self.router_id = f"router-{uuid.uuid4().hex[:12]}"  # presented to workers (per-caller bounds)
        self.directory = WorkerDirectory(client, cfg.key_prefix, cfg.discovery_s, cfg.internal_token,
                                         caller=self.router_id, grace_s=cfg.worker_grace_s)
        # what each worker caches, from their KV events (fed the registry by the directory's refresh)
        self.kv_index = KvIndex(client, cfg.key_prefix, grace_s=cfg.worker_grace_s)
        self.directory.on_refresh = self.kv_index.sync_registry
        self.policy = make_policy(cfg.routing_policy)
        self.store = RequestStore(client, cfg.key_prefix, cfg.request_ttl_s,
                                  live_ttl_s=int(cfg.request_timeout_s) + cfg.request_ttl_s)  # see RouterConfig
        self.metrics = MetricsWriter(client, cfg.key_prefix, self.router_id.removeprefix("router-"))
        self.admission = AdmissionQueue(cfg.max_queued)  # requests waiting for decode room
        self.active: set[str] = set()     # request ids in flight on this router
        self.prom = RouterMetrics(model_id, running=lambda: max(0, len(self.active) - self.queued),
                                  waiting=lambda: self.queued)  # Prometheus, at /metrics of the HTTP port
        self.prom.kv_index(self.kv_index.modes, self.kv_index.block_counts, KV_INDEX_MODES)
        self.token_streams = TokenStreams()   # one Tokens stream per decode worker (router.token_streams)
        self._tasks: set[asyncio.Task] = set()

    @property
    def queued(self) -> int:
        """Requests of this router waiting for KV room now."""
        return self.admission.waiting

    def background(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Start discovery and the Redis writer (called once by the process that owns the core)."""
        await self.directory.start()
        await self.kv_index.start()
        self.background(asyncio.get_running_loop().create_task(self.store.run()))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.token_streams.close()
        await self.kv_index.stop()
        await self.directory.stop()
        await self.client.aclose()

    def refused(self, exc: CleaveError) -> None:
        """Count a request refused before it ran (once, whichever front door refused it)."""
        self.prom.failed(exc.code.name.lower(), None, 0)

    async def _admit(self, request: inference_pb2.GenerateRequest,
                     fill_max_tokens: bool = False) -> tuple[str, list[int]]:
        """Validate and tokenize; returns (request id, prompt ids). Raises InvalidRequest."""
        rid = request_id_of(request)
        if rid in self.active:
            raise InvalidRequest(f"request_id {rid!r} is already in progress; use a unique id")
        check_input_size(request, self.codec, self.model)
        self.active.add(rid)  # claimed before the first await: a twin arriving meanwhile is refused
        try:
            ids = await asyncio.to_thread(prompt_ids_of, request, self.codec, self.model)
            if fill_max_tokens and request.sampling.max_tokens == 0:  # not given: the context left
                request.sampling.max_tokens = max(1, self.model.max_position - len(ids))
            check_sampling(request.sampling, len(ids), self.model)
        except BaseException:
            self.active.discard(rid)
            raise
        return rid, ids

    async def generate(self, request: inference_pb2.GenerateRequest, timeout_s: float | None = None,
                       fill_max_tokens: bool = False):
        """Run one request; yields ``GenerateResponse`` deltas (see the module docstring).

        ``timeout_s``: the client's own deadline in seconds from now (None: none), capped by
        ``cfg.request_timeout_s`` when the operator set one; with neither, the request runs until
        it finishes, its client leaves or it reaches ``max_tokens``. ``fill_max_tokens``: a
        ``max_tokens`` of 0 means the context left after the prompt (OpenAI chat without
        ``max_tokens``). Raises CleaveError subclasses; DeadlineExceeded when the deadline
        passes first.
        """
        t_arrival = now()
        try:
            rid, ids = await self._admit(request, fill_max_tokens)
        except CleaveError as exc:
            self.refused(exc)
            raise
        limits = [t for t in (timeout_s, self.cfg.request_timeout_s or None) if t is not None]
        timeout = min(limits) if limits else None
        missed = f"deadline of {timeout or 0:.1f} s exceeded"  # the error recorded for a missed deadline
        sampling = request.sampling
        req = ValidRequest(rid, ids, sampling, seed_of(sampling),
                           t_arrival + timeout if timeout is not None else float("inf"),
                           list(self.model.eos_token_ids))
        rec = RequestRecorder(self.store, rid)
        rec.to(RequestState.QUEUED, prompt_tokens=len(ids), completion_tokens=0, cached_tokens=0,
               max_tokens=sampling.max_tokens, t_arrival=t_arrival, attempts=0, error="", finish_reason="")
        text = IncrementalText(self.codec, list(sampling.stop))
        run = RequestRun(self, req, rec)
        state, error, finish, count, t_first = RequestState.FAILED, "", None, 0, 0.0
        kind, t_last = "internal", 0.0  # failure kind (a gRPC code name) and last delta's time, for /metrics
        try:
            async with asyncio.timeout(None if timeout is None else max(0.0, req.deadline - now())), \
                    contextlib.aclosing(run.tokens()) as stream:
                async for step in stream:
                    new_ids, reason = step.ids, step.reason
                    if new_ids and count == 0:
                        t_first = now()
                        rec.note(t_first_token=t_first, cached_tokens=run.cached_tokens or 0)
                        self.metrics.record("ttft", rid, t_first - t_arrival)
                        self.prom.first_token(t_first - t_arrival)
                    elif new_ids:
                        self.prom.tokens(now() - t_last, len(new_ids))
                    t_last = now()
                    count += len(new_ids)
                    delta = text.add(new_ids, final=reason is not None)
                    if text.stopped:
                        reason = inference_pb2.FINISH_REASON_STOP
                    msg = inference_pb2.GenerateResponse(request_id=rid, token_ids=new_ids, text=delta,
                                                         logprobs=step.logprobs,
                                                         prompt_logprobs=step.prompt_logprobs)
                    if reason is not None:
                        finish = reason
                        msg.finish_reason = reason
                        msg.usage.prompt_tokens = len(ids)
                        msg.usage.completion_tokens = count
                        msg.usage.cached_tokens = run.cached_tokens or 0
                    yield msg
                    if reason is not None:
                        break
            state = RequestState.FINISHED
            if count > 1:
                self.metrics.record("tpot", rid, (now() - t_first) / (count - 1))
        except (asyncio.CancelledError, GeneratorExit):  # the front door's client left
            if finish is not None:  # closed after its last delta was handed over: it finished
                state = RequestState.FINISHED
            elif time.time() >= req.deadline - _DEADLINE_SLACK_S:
                state, error, kind = RequestState.FAILED, missed, "deadline_exceeded"
            else:
                state, error, kind = RequestState.CANCELLED, "client cancelled the request", "cancelled"
            raise
        except TimeoutError:
            state, error, kind = RequestState.FAILED, missed, "deadline_exceeded"
            raise DeadlineExceeded(f"request {rid} did not finish within its deadline of "
                                   f"{timeout or 0:.1f} s") from None
        except CleaveError as exc:
            error, kind = str(exc), exc.code.name.lower()
            raise
        except grpc.aio.AioRpcError as exc:  # a worker's own status (not retried)
            error, kind = exc.details() or exc.code().name, exc.code().name.lower()
            raise error_for(exc.code(), error) from None
        except Exception as exc:
            log.exception("request %s failed", rid)
            error = f"internal error: {type(exc).__name__}: {exc}"
            raise CleaveError(error) from None
        finally:
            self.active.discard(rid)
            fields = dict(completion_tokens=count, cached_tokens=run.cached_tokens or 0, t_finish=now(),
                          attempts=run.attempts, error=error)
            if finish is not None:
                fields["finish_reason"] = inference_pb2.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
            rec.to(state, **fields)
            queue_s = None if run.t_admitted is None else run.t_admitted - t_arrival
            if state is RequestState.FINISHED:
                self.prom.finished(fields.get("finish_reason", "stop"), len(ids), count, now() - t_arrival,
                                   queue_s, run.attempts)
            else:
                self.prom.failed(kind, queue_s, run.attempts)

    def model_info(self) -> inference_pb2.ModelInfo:
        """The ``GetModelInfo`` answer: model shape and the pools as this router sees them."""
        m = self.model
        pools = []
        for name in ("prefill", "decode"):
            workers = self.directory.registered(name)
            layout = workers[0].record.layout if workers else {"tp": 1, "pp": 1, "cp": 1, "ep": 1}
            pools.append(inference_pb2.PoolInfo(pool=name, instances=len(workers),
                                                layout=inference_pb2.Layout(**{k: int(v) for k, v in layout.items()}),
                                                kv_index_mode=self.kv_index.mode(name),
                                                kv_index_blocks=self.kv_index.blocks(name)))
        block_size = next((w.record.capacity.get("block_size", 0) for w in self.directory.registered("decode")), 0)
        return inference_pb2.ModelInfo(
            model_id=self.model_id, architecture=m.architecture, vocab_size=m.vocab_size,
            max_context_length=m.max_position, eos_token_ids=list(m.eos_token_ids),
            has_chat_template=self.codec.has_chat_template, pools=pools, dtype=m.dtype,
            kv_block_size=block_size)
