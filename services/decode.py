"""The decode service: reserves KV room, receives the prompt's KV, streams tokens.

Lifecycle of one request on a decode instance (called by the router):

1. ``Reserve``: take blocks for the prompt plus one token of headroom from the instance's
   block manager (``engine.block_manager``), sharing the leading blocks its prefix cache holds
   (a conversation's history, a common system prompt), while the blocks left stay above the
   watermark (``RESOURCE_EXHAUSTED`` otherwise); post the KV receives for the rest of the
   prompt only, return the landing descriptor (it names the cached prefix, so the prefill side
   pushes only what is missing).
2. ``Decode``: wait until every KV piece landed (``UNAVAILABLE`` when the transfer failed or
   its deadline passed), commit the prompt's blocks to the prefix cache, hand the sequence to
   the scheduler (``engine.scheduler``: blocks on demand, preemption), stream its tokens: on
   the call, or, with ``stream_id`` (what the router sends), on the caller's ``Tokens`` stream
   with every other sequence of that caller, one message per step (``services.decode_stream``).
   Cancelling the call (client gone, stop string hit) aborts the sequence.
3. ``Abort`` (or the reaper, for reservations never started): cancel the receives, release.

Local prefill (conditional disaggregation, issue 22): ``Reserve(local_prefill=True)`` takes the
same blocks, sharing the cached leading blocks of the prompt except the last token's (its
logits make the first token, so it is always computed), posts no receive and returns the
descriptor as usual (``num_cached_tokens``: what the cache held; nothing is pushed to it).
``Decode(local_prefill=True)`` (``first_token_id`` unset) skips the landing wait and hands the
sequence to the scheduler *prefilling*: it computes the rest of the prompt in chunks between its
decode steps (``--prefill-chunk-tokens`` per step) and samples output number
``first_token_index``. The first ``DecodeChunk`` carries that token (and its logprob when asked),
``cached_tokens`` and ``prefill_seconds``. Prompt logprobs are a prefill instance's job: a local
``Decode`` asking for them is refused (``INVALID_ARGUMENT``).

A reservation's blocks are released exactly once: by :meth:`DecodeService._release` until the
sequence is handed to the scheduler, by the scheduler from then on (which commits what the
sequence computed first, so a next turn finds it cached).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from cleave.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from common.errors import (CallerLimit, InvalidRequest, NoKVRoom, NotFound, Unavailable,
                           abort_with)
from common.grpc_util import add_service, caller_of
from common.kv_hash import prefix_hash
from engine.kv_cache import OutOfBlocks
from engine.sampler import SamplingConfig
from engine.scheduler import DecodeScheduler, Sequence
from kvtransfer.handoff import HandoffError
from engine.runtime.executor import InstanceError
from services.experts.instance import InstanceExperts
from services.decode_stream import SequenceOutput, TokenStreams
from services.token_relay import TokenRelay
from services.worker import WorkerHost, landing_rank_pb

log = logging.getLogger(__name__)

@dataclass
class Reservation:
    """A transfer's bookkeeping; its blocks are the block manager's, under the transfer id."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    deadline: float
    started: bool = False
    caller: str = ""             # who reserved (``common.grpc_util.caller_of``), for the per-caller bound
    cached_tokens: int = 0       # leading prompt tokens the prefix cache held (not pushed)
    handed: bool = False         # the scheduler holds the sequence (and releases its blocks)
    local: bool = False          # local prefill: this instance computes the prompt (no KV pushed)
    prefill_pending: int = 0     # local prefill: prompt tokens still to compute (queued_tokens)


class DecodeService(worker_pb2_grpc.DecodeServicer):
    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        cfg = host.cfg
        self.instance = host.executor
        self.watermark = int(cfg.kv_watermark * host.blocks.total)
        self.scheduler = DecodeScheduler(
            host.forward, host.blocks, cfg.runtime.max_batch, on_step=host.metrics.decode_step,
            prefill_fn=lambda tokens, table, cached: self.instance.prefill(tokens, table, num_cached=cached),
            max_preemptions=cfg.runtime.max_preemptions, watermark=self.watermark,
            on_preempt=host.metrics.preempted, prefill_chunk_tokens=cfg.runtime.prefill_chunk_tokens)
        self._reservations: dict[str, Reservation] = {}
        self._lock = threading.Lock()
        self._reaper: asyncio.Task | None = None
        self._stats_task: asyncio.Task | None = None
        self._relay: TokenRelay | None = None      # made on the serving loop (start(), or the first Decode)
        self.streams = TokenStreams()              # callers' Tokens streams (event loop only)
        self.experts = InstanceExperts(host.executor, host.cfg, host.model_id, host.model_config) \
            if host.model_config.num_experts else None
        if self.experts is not None:
            host.metrics.gauges.add("cleave_expert_hotspot_ratio{layer}",
                                    "Hottest EP rank's routed tokens / mean over EP ranks (1 = balanced)",
                                    lambda: self.experts.hotspots)
        host.load_fn = lambda: self._info()
        host.metrics.gauges.add("cleave_batch_size", "Sequences in the running decode batch",
                                lambda: self.scheduler.num_running)
        host.metrics.gauges.add("cleave_num_preempted", "Preempted sequences waiting to resume",
                                lambda: self.scheduler.num_preempted)

    async def start(self) -> None:
        self._relay = self._relay or TokenRelay(asyncio.get_running_loop())
        if self.experts is not None:         # the pool's placement on every rank before serving
            await asyncio.to_thread(self.experts.start)
        self.scheduler.start()
        self._reaper = asyncio.create_task(self._reap())
        if self.experts is not None:
            self._stats_task = asyncio.create_task(self._expert_beat())

    async def _expert_beat(self) -> None:
        """Once a second, the expert-balancing beat (``services.experts.instance``)."""
        steps = 0
        while True:
            await asyncio.sleep(1.0)
            stepped, steps = self.scheduler.steps != steps, self.scheduler.steps
            try:
                await asyncio.to_thread(self.experts.tick, stepped)
            except Exception as exc:  # a rank's error, as raised there
                log.warning("expert statistics: %s", exc)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.to_thread(self.experts.stop)
        await asyncio.to_thread(self.scheduler.stop)
        for transfer_id in list(self._reservations):
            self._release(transfer_id)

    # ---- RPCs --------------------------------------------------------------------------
    async def Reserve(self, request: worker_pb2.ReserveRequest, context) -> worker_pb2.LandingDescriptor:
        try:
            landing = self._reserve(request, caller_of(context))
            if not request.local_prefill:   # a local prefill computes the prompt here: nothing is pushed
                await self._post_receives(landing)
            return landing
        except Exception as exc:
            await abort_with(context, exc)

    async def _post_receives(self, landing: worker_pb2.LandingDescriptor) -> None:
        """Every rank posts the receives of the uncached part of the prompt. Off the event loop:
        the executor's channel waits for the decode step in progress, and the loop must keep
        relaying tokens meanwhile. A reservation released while they were being posted (an
        Abort, the call cancelled) has them cancelled again by the same thread."""
        transfer_id = landing.transfer_id

        def post() -> bool:
            self.instance.expect(transfer_id, landing.source_layout, landing.num_prompt_tokens,
                                 landing.deadline_unix, first_token=landing.num_cached_tokens)
            with self._lock:
                gone = transfer_id not in self._reservations
            if gone:
                self.instance.cancel(transfer_id)
            return gone

        posting = asyncio.ensure_future(asyncio.to_thread(post))
        posting.add_done_callback(lambda f: f.cancelled() or f.exception())   # retrieved even if we left
        try:
            gone = await asyncio.shield(posting)    # a cancel here leaves the thread to finish (and clean up)
        except BaseException:
            self._release(transfer_id)
            raise
        if gone:
            raise NotFound(f"reservation {transfer_id} was aborted while it was being made")

    def _reserve(self, request: worker_pb2.ReserveRequest, caller: str = "") -> worker_pb2.LandingDescriptor:
        self.host.check_accepting()
        cfg = self.host.cfg
        with self._lock:
            pending = sum(1 for r in self._reservations.values() if not r.started and r.caller == caller)
        limit = self.caller_limit(caller)
        if pending >= limit:
            raise CallerLimit(f"decode worker {self.host.worker_id}: caller {caller or '?'} already holds "
                            f"{pending} reservations that have not started decoding (the per-caller limit "
                            f"is {limit}); retry later")
        model = self.host.model_config
        n, prompt = request.num_prompt_tokens, list(request.prompt_token_ids)
        total = n + request.max_tokens
        if n < 1 or request.max_tokens < 1:
            raise InvalidRequest(f"reserve needs num_prompt_tokens >= 1 and max_tokens >= 1, got "
                                 f"{n} and {request.max_tokens}")
        if total > model.max_position:
            raise InvalidRequest(f"prompt ({n}) + max_tokens ({request.max_tokens}) "
                                 f"exceeds the context length {model.max_position}")
        if prompt and len(prompt) != n:
            raise InvalidRequest(f"prompt_token_ids has {len(prompt)} tokens, num_prompt_tokens says {n}")
        local = request.local_prefill
        if local and not prompt:
            raise InvalidRequest("a local_prefill reservation needs the prompt (prompt_token_ids)")
        blocks, bs = self.host.blocks, cfg.runtime.block_size
        transfer_id = f"{request.request_id}:{uuid.uuid4().hex[:12]}"
        try:   # the prompt and the first decode step's slot; later blocks come on demand
            cached = blocks.allocate(transfer_id, prompt or None, n + 1, max_cached=n - 1 if local else n,
                                     watermark=self.watermark)
        except OutOfBlocks as exc:
            raise NoKVRoom(f"decode worker {self.host.worker_id}: {exc}") from None
        if prompt:
            self.host.metrics.prefix_lookup(n, cached)
        # a reservation lives to the request's deadline (0: none), never past max_reservation_s from now
        most = time.time() + cfg.max_reservation_s
        deadline = min(request.deadline_unix, most) if request.deadline_unix else most
        source = request.source_layout if request.HasField("source_layout") else inference_pb2.Layout(tp=1, pp=1, cp=1, ep=1)
        with self._lock:
            self._reservations[transfer_id] = Reservation(request.request_id, n, request.max_tokens, deadline,
                                                          caller=caller, cached_tokens=cached, local=local,
                                                          prefill_pending=n - cached if local else 0)
        return worker_pb2.LandingDescriptor(
            transfer_id=transfer_id, request_id=request.request_id, layout=self.host.layout,
            num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
            block_size=bs, dtype=model.dtype, block_ids=blocks.table(transfer_id),
            num_prompt_tokens=n, deadline_unix=deadline,
            compat_hash=self.host.compat, transport=self.host.cfg.runtime.transport,
            incarnation=self.host.incarnation, source_layout=source, checksum=self.host.cfg.runtime.checksum,
            ranks=[landing_rank_pb(r) for r in self.instance.landing_ranks()],
            num_cached_tokens=cached,
            cached_prefix_hash=prefix_hash(prompt[:cached], bs, blocks.root) if cached else b"")

    async def Decode(self, request: worker_pb2.DecodeRequest, context):
        transfer_id = request.transfer_id
        with self._lock:
            res = self._reservations.get(transfer_id)
            if res is not None and not res.started:
                res.started = True
            elif res is not None:
                res = None
                dup = True
            else:
                dup = False
        if res is None:
            what = "is already decoding" if dup else "is unknown (expired or aborted)"
            await abort_with(context, NotFound(f"reservation {transfer_id} {what}"))
            return
        try:
            sampling = self._check_decode(request, res)
        except InvalidRequest as exc:
            self._release(transfer_id)
            await abort_with(context, exc)
            return
        if not res.local:
            try:
                t0 = time.perf_counter()
                await self._landed(transfer_id, res.deadline)
                self.host.metrics.transfer(time.perf_counter() - t0)
            except (HandoffError, InstanceError) as exc:
                self.host.metrics.transfer_failed()
                self._release(transfer_id)
                await abort_with(context, Unavailable(f"KV transfer failed: {exc}"))
                return
            except asyncio.CancelledError:
                self._release(transfer_id)
                raise
        prompt = list(request.prompt_token_ids)
        if self._relay is None:      # a Decode that came in before start() finished
            self._relay = TokenRelay(asyncio.get_running_loop())
        seq = self._sequence(request, res, prompt, sampling)
        where = f"{transfer_id} on {self.host.worker_id}"
        output = SequenceOutput(seq, where, self._first_local(res, seq) if res.local else None)
        if request.stream_id:
            try:
                sink, ended = self.streams.bind(request.stream_id, transfer_id, output)
            except Unavailable as exc:
                self._release(transfer_id)
                await abort_with(context, exc)
                return
        else:
            queue: asyncio.Queue = asyncio.Queue()
            sink = queue.put_nowait
        seq.emit = self._relay.emitter(sink)
        try:
            if not res.local:
                self.host.blocks.commit(transfer_id, prompt)     # the prompt's full blocks are now shareable
            res.handed = True                                # the scheduler releases the blocks from now on
            try:
                self.scheduler.add(seq)
            except BaseException:
                res.handed = False
                raise
            if request.stream_id:     # tokens and failure go out on the stream; this call ends with the sequence
                error = await ended   # None once its last message was sent; an error when the stream ended
                if error is not None:
                    await abort_with(context, error)
                return
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunk, error, done = output.chunk(items)
                if chunk is not None:
                    yield chunk
                if error is not None:
                    await abort_with(context, error)
                if done:
                    return
        finally:
            if seq.finished is None:
                self.scheduler.abort(transfer_id)
            if not res.handed:       # the scheduler never took it
                self._release(transfer_id)
            if request.stream_id:
                self.streams.unbind(request.stream_id, transfer_id)

    async def Tokens(self, request: worker_pb2.TokensRequest, context):
        """One caller's token stream (``services.decode_stream``): an empty message once open,
        then one ``TokenBatch`` per burst of its sequences' tokens."""
        try:
            async with contextlib.aclosing(self.streams.serve(request.stream_id)) as batches:
                async for batch in batches:
                    yield batch
        except Unavailable as exc:
            await abort_with(context, exc)

    def _sequence(self, request: worker_pb2.DecodeRequest, res: Reservation, prompt: list[int],
                  sampling: SamplingConfig) -> Sequence:
        """The scheduler's sequence for a checked Decode (its ``emit`` is set by the caller)."""
        release = lambda: self._release(request.transfer_id)   # noqa: E731
        common = dict(seq_id=request.transfer_id, sampling=sampling, eos_token_ids=frozenset(request.eos_token_ids),
                      ignore_eos=request.sampling.ignore_eos, emit=None, release=release,
                      max_tokens=request.first_token_index + res.max_tokens)
        if res.local:   # the scheduler computes the uncached rest of the prompt and samples the first token
            return Sequence(tokens=prompt, num_cached=res.cached_tokens, prefilling=True,
                            generated=request.first_token_index, **common)
        return Sequence(tokens=prompt + [request.first_token_id], num_cached=res.num_prompt_tokens,
                        generated=request.first_token_index + 1, **common)

    def _first_local(self, res: Reservation, seq: Sequence):
        """The first chunk of a local prefill reports it (and the prompt is no longer queued)."""
        def first() -> dict:
            res.prefill_pending = 0
            self.host.metrics.local_prefill(res.num_prompt_tokens - res.cached_tokens)
            return dict(cached_tokens=res.cached_tokens, prefill_seconds=seq.prefill_seconds)
        return first

    def caller_limit(self, caller: str) -> int:
        """Reservations not yet decoding that one caller may hold: ``max_reservations_per_caller``;
        a caller presenting its identity (a router) at least one per KV block, so its budget
        scales with the instance. Callers are counted apart (``common.grpc_util.caller_of``)."""
        limit = self.host.cfg.max_reservations_per_caller
        return limit if caller.startswith("host:") else max(limit, self.host.blocks.total)

    def _check_decode(self, request: worker_pb2.DecodeRequest, res: Reservation) -> SamplingConfig:
        """The request's own inputs, checked before it joins a batch (a bad one would fail the step)."""
        vocab = self.host.model_config.vocab_size
        if request.local_prefill != res.local:
            raise InvalidRequest(f"reservation {request.transfer_id} was made " + (
                "for a local prefill: Decode must set local_prefill" if res.local else
                "for a pushed prompt: Decode cannot set local_prefill (reserve with local_prefill)"))
        if res.local and request.sampling.prompt_logprobs:
            raise InvalidRequest("prompt logprobs are not computed by a local prefill on a decode instance "
                                 "(send the request through a prefill instance)")
        if len(request.prompt_token_ids) != res.num_prompt_tokens:
            raise InvalidRequest(f"prompt_token_ids has {len(request.prompt_token_ids)} tokens, the reservation "
                                 f"holds {res.num_prompt_tokens}")
        bad = [t for t in (request.first_token_id, *request.eos_token_ids, *request.prompt_token_ids)
               if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        try:
            return SamplingConfig.from_proto(request.sampling, request.seed)
        except ValueError as exc:
            raise InvalidRequest(f"sampling parameters: {exc}") from None

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        ids = [request.transfer_id] if request.transfer_id else [
            t for t, r in list(self._reservations.items()) if r.request_id == request.request_id]
        found = False
        for transfer_id in ids:
            with self._lock:   # forgotten here, at once: a Decode arriving next finds nothing to start
                res = self._reservations.get(transfer_id)
                if res is not None and not res.started:
                    del self._reservations[transfer_id]
            if res is None:
                continue
            found = True
            if res.started:
                self.scheduler.abort(transfer_id)
            else:   # its receives and blocks: off the loop (the channel waits for the step in progress)
                await asyncio.to_thread(self._free, transfer_id, res)
        return worker_pb2.AbortResponse(found=found)

    async def Info(self, request, context) -> worker_pb2.WorkerInfo:
        return self._info()

    async def ExpertLoad(self, request, context) -> worker_pb2.ExpertLoadInfo:
        """The placement in force, per-rank computed pairs and the switches made here."""
        if self.experts is None:
            await abort_with(context, InvalidRequest(f"model {self.host.model_id} has no experts"))
            return
        try:
            return await asyncio.to_thread(self.experts.load_info)
        except Exception as exc:  # a rank's error, as raised there
            await abort_with(context, Unavailable(str(exc)))

    # ---- internals -------------------------------------------------------------------------
    def busy(self) -> int:
        """Reservations and running sequences here; the worker drains until this is 0."""
        with self._lock:
            return len(self._reservations)

    def _info(self) -> worker_pb2.WorkerInfo:
        with self._lock:
            waiting = sum(1 for r in self._reservations.values() if not r.started)
            queued = sum(r.prefill_pending for r in self._reservations.values())
        return self.host.info(running=self.scheduler.num_running, waiting=waiting, queued_tokens=queued)

    async def _landed(self, transfer_id: str, deadline: float) -> None:
        """Poll every rank until the KV landed (never blocking the command channel). Each poll
        verifies and scatters whatever pieces have landed since the last one. The router calls
        Decode once the prefill side reports the push done, so the first poll usually lands it
        all; later polls come 1 ms apart, backing off to 5 ms."""
        delay, table = 0.001, self.host.blocks.table(transfer_id)
        while not await asyncio.to_thread(self.instance.try_land, transfer_id, table):
            if time.time() > deadline + 1.0:
                raise HandoffError(f"transfer {transfer_id} did not land by its deadline")
            await asyncio.sleep(delay)
            delay = min(0.005, delay * 2)

    def _release(self, transfer_id: str) -> None:
        """Forget a reservation, cancel its receives and, unless the scheduler holds its sequence
        (which releases them itself), release its blocks; safe to call twice."""
        with self._lock:
            res = self._reservations.pop(transfer_id, None)
        if res is not None:
            self._free(transfer_id, res)

    def _free(self, transfer_id: str, res: Reservation) -> None:
        """What :meth:`_release` does once the reservation is forgotten; it waits for the
        executor's channel (a decode step in progress): run it off the event loop."""
        try:
            if not res.local:       # a local prefill posted no receives
                self.instance.cancel(transfer_id)
        except Exception as exc:  # a rank's error, as raised there
            log.warning("cancelling %s: %s", transfer_id, exc)
        if not res.handed:
            self.host.blocks.release(transfer_id)

    async def _reap(self) -> None:
        """Free reservations whose Decode never came (router gone) well past their deadline."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            with self._lock:   # forgotten at once: a Decode arriving next finds nothing to start
                stale = [(t, r) for t, r in self._reservations.items()
                         if not r.started and now > r.deadline + self.host.cfg.reservation_grace_s]
                for transfer_id, _ in stale:
                    del self._reservations[transfer_id]
            for transfer_id, res in stale:
                log.warning("freeing reservation %s: never decoded", transfer_id)
                await asyncio.to_thread(self._free, transfer_id, res)


def add_to_server(servicer: DecodeService, server: grpc.aio.Server) -> None:
    add_service(server, servicer, worker_pb2.DESCRIPTOR.services_by_name["Decode"], servicer.host.cfg.internal_token)
