"""The prefill service: runs a prompt, samples token 1, pushes the prompt's KV to decode.

Lifecycle of one ``Prefill`` call (from the router):

1. Queue for the model (one prompt runs at a time: prefill is compute-bound and the
   instance's cores are shared); ``queued_tokens`` is the load the router routes on.
2. Take the prompt's blocks from the instance's block manager (``engine.block_manager``): the
   leading blocks its prefix cache holds are shared, so only the rest is computed (all of it
   when the request asks for prompt logprobs); run the forward pass over that part, commit
   the prompt's full blocks to the cache, sample token 1 with the request's seed (output
   index 0). The token event says how many prompt tokens were cached.
3. When a landing descriptor is given, push the KV (``kvtransfer.handoff.KVSender``) of the
   tokens the decode instance lacks (the descriptor names its cached prefix): the
   compatibility hash, the cached prefix's hash and the deadline are checked before any work.
4. Release the prompt's blocks, always (they stay cached until evicted). ``Abort`` or a
   cancelled call stops a queued prompt and fails an in-flight transfer.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from cleave.v1 import worker_pb2, worker_pb2_grpc
from common.config import MAX_TOP_LOGPROBS
from common.errors import Cancelled, Exhausted, InvalidRequest, RequestFault, Unavailable, abort_with
from common.grpc_util import add_service
from engine.batch import ForwardCancelled
from engine.kv_cache import OutOfBlocks
from engine.logprobs import logprobs_of
from engine.sampler import SamplingConfig, SamplingError, sample_one
from kvtransfer.handoff import HandoffError, IncompatiblePeer, check_cached_prefix
from engine.runtime.executor import InstanceError
from services.worker import WorkerHost, logprob_pb


class IncompatibleLanding(InvalidRequest):
    """The landing descriptor does not match this instance (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PrefillService(worker_pb2_grpc.PrefillServicer):
    def __init__(self, host: WorkerHost) -> None:
        self.host = host
        # one prompt at a time on the model; transfers overlap with the next prompt
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")
        self._transfers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-push")
        self._active: dict[str, threading.Event] = {}
        self._queued_tokens = 0
        self._running = 0
        self._lock = threading.Lock()
        host.load_fn = lambda: self._info()
        host.metrics.gauges.add("cleave_prefill_queue_tokens", "Prompt tokens queued or running",
                                lambda: self._queued_tokens)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for event in list(self._active.values()):
            event.set()
        self._compute.shutdown(wait=True, cancel_futures=True)
        self._transfers.shutdown(wait=True, cancel_futures=True)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context):
        try:
            self._validate(request)
        except Exception as exc:
            await abort_with(context, exc)
            return
        cancelled = threading.Event()
        n = len(request.token_ids)
        owner = f"{request.request_id}:{id(cancelled)}"
        with self._lock:
            self._active[request.request_id] = cancelled
            self._queued_tokens += n
        loop = asyncio.get_running_loop()
        ran = False
        try:
            event = await loop.run_in_executor(self._compute, self._run, request, owner, cancelled)
            ran = True
            with self._lock:
                self._queued_tokens -= n
                n = 0
            yield event
            if request.HasField("landing"):
                t0 = time.perf_counter()
                try:
                    sent = await loop.run_in_executor(
                        self._transfers, self.host.executor.push, request.landing,
                        self.host.blocks.table(owner), cancelled, request.transfer_timeout_s)
                except Exception:
                    self.host.metrics.transfer_failed()
                    raise
                self.host.metrics.transfer(time.perf_counter() - t0, sent)
                yield worker_pb2.PrefillEvent(transferred=worker_pb2.TransferDone(
                    transfer_seconds=time.perf_counter() - t0, transfer_bytes=sent))
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except IncompatiblePeer as exc:
            await abort_with(context, IncompatibleLanding(str(exc)))
        except InstanceError as exc:  # the instance is down, or a rank's error could not be carried
            await abort_with(context, Unavailable(f"prefill instance {self.host.worker_id} failed: {exc}"))
        except HandoffError as exc:
            await abort_with(context, Unavailable(f"KV push failed: {exc}"))
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            cancelled.set()  # a transfer still running in its thread stops at its next poll
            self._release_after_run(owner, ran)
            with self._lock:
                self._active.pop(request.request_id, None)
                self._queued_tokens -= n

    def _release_after_run(self, owner: str, ran: bool) -> None:
        """Release the prompt's blocks once its run is over: now when it ``ran`` to its end, else
        queued on the model thread, so it comes after a run still going when the call was
        cancelled (one thread, in order)."""
        def release() -> None:
            if self.host.blocks.holds(owner):
                self.host.blocks.release(owner)
        if ran:
            return release()
        try:
            self._compute.submit(release)
        except RuntimeError:          # shut down: no run can still be going
            release()

    def busy(self) -> int:
        """Prompts queued, running or pushing KV here; the worker drains until this is 0."""
        with self._lock:
            return len(self._active)

    def _validate(self, request: worker_pb2.PrefillRequest) -> None:
        self.host.check_accepting()
        model = self.host.model_config
        n = len(request.token_ids)
        if n == 0:
            raise InvalidRequest("prefill needs at least one prompt token")
        if n > model.max_position:
            raise InvalidRequest(f"prompt of {n} tokens exceeds the context length {model.max_position}")
        bad = [t for t in request.token_ids if t >= model.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary (size {model.vocab_size})")
        if request.sampling.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"sampling.top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got "
                                 f"{request.sampling.top_logprobs}")
        try:
            SamplingConfig.from_proto(request.sampling, request.seed)
        except ValueError as exc:
            raise InvalidRequest(f"sampling parameters: {exc}") from None
        if request.HasField("landing"):
            self._check_landing(request.landing, list(request.token_ids))

    def _check_landing(self, landing, prompt: list[int]) -> None:
        """Refuse a landing this instance can never serve before any work (or byte) is spent."""
        try:
            self.host.executor.check_landing(landing)
            check_cached_prefix(landing, prompt)
        except IncompatiblePeer as exc:
            raise IncompatibleLanding(f"{self.host.worker_id}: {exc}") from None
        if landing.deadline_unix <= time.time():
            raise Unavailable(f"transfer {landing.transfer_id}: its deadline passed before prefill "
                              f"started (the request ran out of time)")

    def _run(self, request: worker_pb2.PrefillRequest, owner: str,
             cancelled: threading.Event) -> worker_pb2.PrefillEvent:
        """Model thread: allocate the prompt's blocks (kept until the transfer is done), run,
        sample; the token event, with the logprobs the sampling asks for."""
        if cancelled.is_set():
            raise Cancelled(f"request {request.request_id} was aborted before its prefill started")
        tokens, blocks = list(request.token_ids), self.host.blocks
        cfg = SamplingConfig.from_proto(request.sampling, request.seed)  # checked in _validate
        k = request.sampling.top_logprobs if request.sampling.prompt_logprobs else -1
        try:   # at least the last token is computed (its logits); prompt logprobs need every position
            cached = blocks.allocate(owner, tokens, len(tokens), max_cached=len(tokens) - 1 if k < 0 else 0)
        except OutOfBlocks as exc:
            raise Exhausted(f"prefill worker {self.host.worker_id}: {exc}") from None
        self.host.metrics.prefix_lookup(len(tokens), cached)
        with self._lock:
            self._running += 1
        try:
            t0 = time.perf_counter()
            try:
                out = self.host.executor.prefill(tokens, blocks.table(owner), cancelled, prompt_logprobs=k,
                                                 num_cached=cached)
                blocks.commit(owner, tokens)
            except ForwardCancelled:
                raise Cancelled(f"request {request.request_id} was aborted during its prefill") from None
            try:
                token = sample_one(out.logits[0], cfg, request.output_index)
            except SamplingError as exc:  # this request's own, and the same on any worker
                raise RequestFault(f"prefill of request {request.request_id} on {self.host.worker_id}: "
                                   f"{exc}") from None
            event = worker_pb2.PrefillEvent(token_id=token, prefill_seconds=time.perf_counter() - t0,
                                            cached_tokens=cached)
            if cfg.logprobs >= 0:
                event.token_logprob.CopyFrom(logprob_pb(logprobs_of(out.logits, [token], cfg.logprobs)[0]))
            event.prompt_logprobs.extend(logprob_pb(e) for e in out.prompt_logprobs or ())
            return event
        except BaseException:
            blocks.release(owner)       # nothing to push; a partly computed block is never committed
            raise
        finally:
            with self._lock:
                self._running -= 1

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        with self._lock:
            event = self._active.get(request.request_id)
        if event is not None:
            event.set()
        return worker_pb2.AbortResponse(found=event is not None)

    async def Info(self, request, context) -> worker_pb2.WorkerInfo:
        return self._info()

    def _info(self) -> worker_pb2.WorkerInfo:
        with self._lock:
            running, queued, active = self._running, self._queued_tokens, len(self._active)
        return self.host.info(running=running, waiting=max(0, active - running), queued_tokens=queued)


def add_to_server(servicer: PrefillService, server: grpc.aio.Server) -> None:
    add_service(server, servicer, worker_pb2.DESCRIPTOR.services_by_name["Prefill"], servicer.host.cfg.internal_token)
