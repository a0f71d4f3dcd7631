"""One request's life in the router (DESIGN §4): reserve, prefill, transfer, decode, stream.

:class:`RequestRun` is created per ``Generate`` call by ``router.server``, and yields
``(new_token_ids, finish_reason | None)`` pairs. An *attempt* is one pass through
reserve → prefill → decode. A worker failure (``UNAVAILABLE`` and friends) starts a new
attempt on other workers that continues from the tokens already streamed: the prompt plus
those tokens are prefilled again and sampling resumes at the same output index, so greedy
and seeded output is unchanged and nothing the client received is repeated.

Decode tokens come on one ``Tokens`` stream per decode worker shared by this router's requests
(``router.token_streams``: one message per decode step for all of them); each request keeps its
own ``Decode`` call, whose cancellation aborts its sequence. That stream ending fails over every
request reading it.

Whatever ends an attempt, its ``finally`` cancels the worker calls still open and aborts the
decode reservation (unless its sequence finished there: the worker released it), so both sides
free their blocks.

KV room: the request waits (bounded) for a decode instance with room for its prompt plus one
token, what the decode instance reserves (it takes further blocks on demand while decoding and
reuses cached prefix blocks of the prompt it is sent); a prompt no instance's whole cache could
hold is refused at once. ``max_tokens`` is a bound, not a reservation: an SDK chat that sends
none (the rest of the context) takes only the KV it uses. A sequence that outgrows a whole
instance's cache ends with RESOURCE_EXHAUSTED from the decode instance.

``RequestRun.cached_tokens``: the prompt tokens the prefill instance served from its prefix
cache, as reported with the request's first token (a retry after tokens were streamed does
not change it); None until then.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from cleave.v1 import inference_pb2, worker_pb2
from common.errors import Exhausted, InvalidRequest, NoKVRoom, Unavailable, answered_as, is_request_fault
from common.config import PREFILL_SATURATED_TOKENS
from common.kv_hash import chain_root
from router.kv_index import PromptHashes
from router.request_state import RequestRecorder, RequestState, claim
from router.workers import WorkerHandle, unreachable

log = logging.getLogger(__name__)

LENGTH = inference_pb2.FINISH_REASON_LENGTH
STOP = inference_pb2.FINISH_REASON_STOP
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
              grpc.StatusCode.CANCELLED}


class _Layout:
    """A registry record's layout dict as the attributes ``common.kv_hash.chain_root`` reads."""

    def __init__(self, layout: dict) -> None:
        self.tp, self.pp, self.cp, self.ep = (int(layout.get(k, 1) or 1) for k in ("tp", "pp", "cp", "ep"))


class RetryableFailure(Exception):
    """A worker failed this attempt; another attempt on other workers may succeed."""


@dataclass
class Delta:
    """What one step of a request adds: new token ids, the finish reason on the last delta,
    one ``inference_pb2.TokenLogprob`` per id when the request asked for logprobs, and the
    prompt's (first delta only) when it asked for prompt logprobs."""

    ids: list[int]
    reason: int | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)


@dataclass
class ValidRequest:
    """A request the router has validated and tokenized."""

    request_id: str
    prompt_ids: list[int]
    sampling: inference_pb2.SamplingParams
    seed: int
    deadline: float                   # unix seconds
    eos_token_ids: list[int] = field(default_factory=list)


class RequestRun:
    """One request's attempts; its state goes through ``recorder`` (the request's one recorder)."""

    def __init__(self, core, req: ValidRequest, recorder: RequestRecorder) -> None:
        self.core = core                  # router.server.RouterCore
        self.req = req
        self.recorder = recorder
        self.generated: list[int] = []    # tokens already handed to the client
        self.attempts = 0
        self.t_admitted: float | None = None  # unix time the first decode reservation succeeded
        self._excluded: set[tuple[str, str]] = set()  # worker incarnations that failed this request
        self._prompt_scored = False       # the client has the prompt logprobs (or did not ask)
        self.cached_tokens: int | None = None  # prefix-cached prompt tokens (see the module docstring)

    def _sampling(self) -> inference_pb2.SamplingParams:
        """The sampling of the next attempt: a retry after the first delta asks no prompt logprobs."""
        if not (self._prompt_scored and self.req.sampling.prompt_logprobs):
            return self.req.sampling
        params = inference_pb2.SamplingParams()
        params.CopyFrom(self.req.sampling)
        params.prompt_logprobs = False
        return params

    async def tokens(self):
        """Yields :class:`Delta` until the request finishes (a request for ``max_tokens`` 0
        yields one, with no ids: its prompt logprobs)."""
        last_error: Exception | None = None
        while True:
            if self.attempts >= self.core.cfg.max_attempts:
                raise Unavailable(f"request {self.req.request_id} failed after {self.attempts} "
                                  f"attempts; last error: {last_error}")
            self.attempts += 1  # attempts made, as recorded in Redis
            try:
                async with contextlib.aclosing(self._attempt()) as stream:
                    async for delta in stream:
                        self.generated.extend(delta.ids)
                        self._prompt_scored = True  # prompt logprobs come once, with the first delta
                        yield delta
                        if delta.reason is not None:
                            return
                raise RetryableFailure("decode stream ended before the request finished")
            except RetryableFailure as exc:
                last_error = exc
                log.warning("request %s attempt %d failed: %s", self.req.request_id, self.attempts, exc)

    async def _attempt(self):
        req, core, rec = self.req, self.core, self.recorder
        prompt = req.prompt_ids + self.generated
        remaining = req.sampling.max_tokens - len(self.generated)
        hashes = PromptHashes(prompt)             # one hash pass per distinct chain root
        mode, why = self._prefill_route(prompt, remaining, hashes)
        if core.prom.prefill_route(mode, why):
            log.info("prefill route %s (%s), first seen on request %s", mode, why, req.request_id)
        if mode == "local":
            async for delta in self._local_attempt(prompt, remaining, hashes, why):
                yield delta
            return
        prefill, predicted = await self._pick_prefill(prompt, hashes)
        # claimed before any await, so the requests of a burst see each other and spread
        with claim(prefill, len(prompt)) as prefill_load:
            if remaining == 0:  # max_tokens 0: score the prompt, generate nothing
                async for delta in self._prefill_only(prefill, prompt):
                    yield delta
                return
            decode, landing, decode_load, predicted_decode = await self._reserve(prompt, remaining, prefill, hashes)
            self._delivered("decode", predicted_decode, landing.num_cached_tokens)
            if self.t_admitted is None:
                self.t_admitted = time.time()
            prefill_call = first = None
            decoded = False
            try:
                rec.to(RequestState.PREFILLING, attempts=self.attempts, prefill_worker=prefill.record.worker_id,
                       decode_worker=decode.record.worker_id, decode_cached_tokens=landing.num_cached_tokens,
                       predicted_cached_tokens=predicted, predicted_decode_cached_tokens=predicted_decode,
                       prefill_mode="pool", prefill_reason=why)
                prefill_call = prefill.stub.Prefill(worker_pb2.PrefillRequest(
                    request_id=req.request_id, token_ids=prompt, sampling=self._sampling(), seed=req.seed,
                    landing=landing, output_index=len(self.generated),
                    transfer_timeout_s=core.cfg.transfer_timeout_s), timeout=self._time_left())
                async for event in self._rpc(prefill, prefill_call):
                    if event.WhichOneof("event") == "token_id":
                        first = event.token_id
                        if self.cached_tokens is None:     # the attempt that makes the first token
                            self.cached_tokens = event.cached_tokens
                        self._delivered("prefill", predicted, event.cached_tokens)
                        prefill_load.release()     # the prompt is computed; its push may go on
                        done = self._finish_reason(first, remaining)
                        yield Delta([first], done, [event.token_logprob] if event.HasField("token_logprob") else [],
                                    list(event.prompt_logprobs))
                        if done is not None:
                            return
                        rec.to(RequestState.TRANSFERRING)
                    elif event.WhichOneof("event") == "transferred":
                        rec.note(kv_transfer_bytes=event.transferred.transfer_bytes)
                        break
                if first is None:
                    raise RetryableFailure(f"prefill worker {prefill.record.worker_id} ended without a token")
                rec.to(RequestState.DECODING)
                async with contextlib.aclosing(self._decode(decode, worker_pb2.DecodeRequest(
                        transfer_id=landing.transfer_id, prompt_token_ids=prompt, first_token_id=first,
                        first_token_index=len(self.generated), sampling=req.sampling, seed=req.seed,
                        eos_token_ids=req.eos_token_ids))) as chunks:
                    async for chunk in chunks:
                        decoded = chunk.finished   # the worker released the sequence itself
                        yield self._delta(chunk)
                        if chunk.finished:
                            return
            finally:
                decode_load.release()
                if prefill_call is not None:
                    prefill_call.cancel()
                if not decoded:
                    self._abort_later(decode, landing.transfer_id)

    def _prefill_route(self, prompt: list[int], remaining: int, hashes: PromptHashes) -> tuple[str, str]:
        """``("local", why)`` when this attempt prefills on its decode instance (conditional
        disaggregation: the prefill pool is empty or saturated, or the tokens the best decode
        instance's cache lacks are at most ``--local-prefill-max-tokens``), else ``("pool", why)``.
        Requests for prompt logprobs or for no new token always use the pool."""
        core = self.core
        if remaining == 0 or self.req.sampling.prompt_logprobs:
            return "pool", "prompt scoring"
        decodes, prefills = core.directory.pool("decode"), core.directory.pool("prefill")
        if not prefills:
            return "local", "no prefill instance"
        if not decodes:
            return "pool", "no decode instance yet"
        short = core.cfg.local_prefill_max_tokens
        if short and len(prompt) - max(self._predict("decode", w, prompt, hashes) for w in decodes) <= short:
            return "local", "short"
        if min(w.record.load.get("queued_tokens", 0) + w.inflight_tokens for w in prefills) >= PREFILL_SATURATED_TOKENS:
            return "local", "prefill pool saturated"
        return "pool", "long"

    async def _local_attempt(self, prompt: list[int], remaining: int, hashes: PromptHashes, why: str):
        """One attempt prefilled by its decode instance: reserve there (``local_prefill``), then
        one Decode call that streams the first token and the rest."""
        req, rec = self.req, self.recorder
        decode, landing, decode_load, predicted = await self._reserve(prompt, remaining, None, hashes, local=True)
        if self.t_admitted is None:
            self.t_admitted = time.time()
        decoded = False
        try:
            rec.to(RequestState.PREFILLING, attempts=self.attempts, prefill_worker=decode.record.worker_id,
                   decode_worker=decode.record.worker_id, decode_cached_tokens=landing.num_cached_tokens,
                   predicted_decode_cached_tokens=predicted, prefill_mode="local", prefill_reason=why)
            first = True
            async with contextlib.aclosing(self._decode(decode, worker_pb2.DecodeRequest(
                    transfer_id=landing.transfer_id, prompt_token_ids=prompt, first_token_index=len(self.generated),
                    sampling=self._sampling(), seed=req.seed, eos_token_ids=req.eos_token_ids,
                    local_prefill=True))) as chunks:
                async for chunk in chunks:
                    if first:
                        first = False
                        if self.cached_tokens is None:
                            self.cached_tokens = chunk.cached_tokens
                        self._delivered("decode", predicted, chunk.cached_tokens)
                        rec.to(RequestState.DECODING)
                    decoded = chunk.finished     # the worker released the sequence itself
                    yield self._delta(chunk)
                    if chunk.finished:
                        return
        finally:
            decode_load.release()
            if not decoded:
                self._abort_later(decode, landing.transfer_id)

    async def _prefill_only(self, prefill: WorkerHandle, prompt: list[int]):
        """A prefill with no KV push and no decode; its sampled token is dropped."""
        req = self.req
        call = None
        try:
            self.recorder.to(RequestState.PREFILLING, attempts=self.attempts, prefill_worker=prefill.record.worker_id)
            call = prefill.stub.Prefill(worker_pb2.PrefillRequest(
                request_id=req.request_id, token_ids=prompt, sampling=self._sampling(), seed=req.seed),
                timeout=self._time_left())
            async for event in self._rpc(prefill, call):
                if event.WhichOneof("event") == "token_id":
                    if self.cached_tokens is None:
                        self.cached_tokens = event.cached_tokens
                    yield Delta([], LENGTH, [], list(event.prompt_logprobs))
                    return
            raise RetryableFailure(f"prefill worker {prefill.record.worker_id} ended without a token")
        finally:
            if call is not None:
                call.cancel()

    def _finish_reason(self, token: int, remaining: int):
        if token in self.req.eos_token_ids and not self.req.sampling.ignore_eos:
            return STOP
        return LENGTH if remaining <= 1 else None

    def _decode(self, decode: WorkerHandle, request: worker_pb2.DecodeRequest):
        """The ``DecodeChunk``s of one Decode call, whose tokens come on this router's token
        stream from ``decode`` (``router.token_streams``); failures as :meth:`_rpc` raises them.
        Closing it cancels the call (the worker aborts the sequence)."""
        return self._rpc(decode, self._stream_chunks(decode, request))

    @staticmethod
    def _delta(chunk: worker_pb2.DecodeChunk) -> Delta:
        """A decode chunk as the request's step (its finish reason only on the last)."""
        return Delta(list(chunk.token_ids), (chunk.finish_reason or STOP) if chunk.finished else None,
                     list(chunk.logprobs))

    async def _stream_chunks(self, decode: WorkerHandle, request: worker_pb2.DecodeRequest):
        """Registers on ``decode``'s token stream (opening it when needed), makes the Decode
        call naming it, yields the chunks; a failure comes out of the queue as an exception."""
        stream = await self.core.token_streams.of(decode)
        queue = stream.register(request.transfer_id)  # before the call: chunks may come before its reply
        request.stream_id = stream.id
        call = watcher = None
        try:
            call = decode.stub.Decode(request, timeout=self._time_left())
            watcher = stream.watch(request.transfer_id, call)
            async for chunk in stream.chunks(queue):
                yield chunk
        finally:
            stream.unregister(request.transfer_id)
            if call is not None:
                call.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _rpc(self, worker: WorkerHandle, call):
        """Iterate a worker stream (a call, or an async generator: closed with this one), turning
        worker failures into RetryableFailure. A call that grpc cancels under us (its channel
        closed) is the worker's failure, not the client's: only a cancel of this task itself is
        the client leaving."""
        worker.calls += 1
        try:
            async with contextlib.aclosing(call) if hasattr(call, "aclose") else contextlib.nullcontext():
                async for msg in call:
                    yield msg
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            self._excluded.add(worker.ident)
            raise RetryableFailure(f"{worker.key}: the call was cancelled under the request "
                                   f"(its channel closed)") from None
        except grpc.aio.AioRpcError as exc:
            if unreachable(exc):
                self.core.directory.failed_to_reach(worker, f"request {self.req.request_id}")
            # a failure the worker marks as the request's own would repeat on any worker
            if exc.code() in _RETRYABLE and not is_request_fault(exc) and time.time() < self.req.deadline:
                self._excluded.add(worker.ident)
                raise RetryableFailure(f"{worker.key}: {exc.code().name}: {exc.details()}") from None
            raise
        finally:
            worker.calls -= 1

    async def _routable(self, pool: str) -> list[WorkerHandle]:
        """The pool's routable workers; while there are none (a restart, a registry gap) wait
        for one, up to ``pool_wait_s`` and the request's deadline. Raises Unavailable."""
        core = self.core
        give_up = min(self.req.deadline, time.time() + core.cfg.pool_wait_s)
        while not (workers := core.directory.pool(pool)):
            if time.time() >= give_up:
                raise Unavailable(f"no {pool} worker is registered and reachable (waited "
                                  f"{core.cfg.pool_wait_s:.0f} s); start one (e.g. `make run`) and retry")
            await asyncio.sleep(0.1)
            await self._refresh()
        return workers

    async def _refresh(self) -> None:
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(0.5):  # a frozen Redis must not hold the request
                await self.core.directory.refresh()

    def _time_left(self, cap: float | None = None) -> float | None:
        """Seconds to the request's deadline (None: it has none), at most ``cap``."""
        left = max(0.001, self.req.deadline - time.time())
        left = min(left, cap) if cap is not None else left
        return None if left == float("inf") else left

    async def _pick_prefill(self, prompt: list[int], hashes: PromptHashes) -> tuple[WorkerHandle, int]:
        """The prefill instance for ``prompt`` (the policy over the KV index's view of what each
        caches) and the cached tokens the index predicts there."""
        workers = await self._routable("prefill")
        # a prefill instance computes at least the prompt's last token (its logits)
        cached = {w.record.worker_id: min(len(prompt) - 1, self._predict("prefill", w, prompt, hashes))
                  for w in workers}
        ranked = self.core.policy.rank_prefill(workers, len(prompt), cached)
        fresh = [w for w in ranked if w.ident not in self._excluded]
        chosen = (fresh or ranked)[0]
        self._routed("prefill", chosen, prompt, hashes)
        return chosen, cached[chosen.record.worker_id] // self._block_size(chosen) * self._block_size(chosen)

    def _predict(self, pool: str, worker: WorkerHandle, prompt: list[int], hashes: PromptHashes) -> int:
        """Prompt tokens the router's KV index says ``worker`` holds (0 with a blind policy)."""
        index = self.core.kv_index
        return index.cached_tokens(pool, worker.record.worker_id, prompt, hashes) if index is not None else 0

    def _routed(self, pool: str, worker: WorkerHandle, prompt: list[int], hashes: PromptHashes) -> None:
        """Tell the KV index where ``prompt`` went (its prediction while events are missing)."""
        index = self.core.kv_index
        if index is None:
            return
        known = index.root_of(pool, worker.record.worker_id)
        root, bs = known or (chain_root(worker.record.compat_hash, _Layout(worker.record.layout)),
                             self._block_size(worker))
        index.note_routed(pool, worker.record.worker_id, worker.record.incarnation, root, bs, prompt, hashes)

    def _delivered(self, pool: str, predicted: int, delivered: int) -> None:
        self.core.prom.prediction(pool, predicted, delivered)

    @staticmethod
    def _block_size(worker: WorkerHandle) -> int:
        return max(1, int(worker.record.capacity.get("block_size", 16)))

    async def _reserve(self, prompt: list[int], max_tokens: int, prefill: WorkerHandle | None,
                       hashes: PromptHashes, local: bool = False):
        """``(decode worker, landing descriptor, the claim on it, the cached tokens the KV index
        predicted there)``: a reservation for the prompt
        plus one token (what the decode instance reserves; later blocks come on demand), waiting
        (bounded) for room. Raises Exhausted at once when no instance could ever hold that, or
        after the admission wait."""
        core, num_tokens = self.core, len(prompt)
        needed = num_tokens + 1
        give_up = time.time() + core.cfg.admission_wait_s
        layout = inference_pb2.Layout(**{k: int(v) for k, v in (prefill.record.layout if prefill else {}).items()})
        queued, refusal, kv_only = False, "none", True   # kv_only: every refusal was for KV room
        try:
            while True:
                workers = await self._routable("decode")
                fits = [w for w in workers if core.policy.can_hold(w, needed)]
                if not fits:
                    raise Exhausted(f"the prompt ({num_tokens} tokens, + 1 to decode into) is more KV than "
                                    f"any decode instance holds; shorten it or add decode instances with "
                                    f"larger KV caches")
                cached = {w.record.worker_id: self._predict("decode", w, prompt, hashes) for w in fits}
                ranked = core.policy.rank_decode(fits, needed, cached) or sorted(
                    fits, key=lambda w: -w.record.load.get("free_blocks", 0))
                ranked = [w for w in ranked if w.ident not in self._excluded] or ranked
                for worker in ranked:
                    # claimed while the reservation is in flight, so concurrent requests rank
                    # this worker as busier and spread; given back when it is refused
                    load = claim(worker, needed)
                    landing = None
                    try:
                        landing, why, room = await self._try_reserve(worker, prompt, max_tokens, layout, local)
                        refusal, kv_only = why or refusal, kv_only and room
                    finally:
                        if landing is None:
                            load.release()
                    if landing is not None:
                        self._routed("decode", worker, prompt, hashes)
                        return worker, landing, load, cached[worker.record.worker_id]
                if not queued:
                    queued = core.admission.wait()   # raises Exhausted when the queue is full
                if time.time() >= give_up or time.time() >= self.req.deadline:
                    what = "had KV room for" if kv_only else "took a reservation for"
                    raise Exhausted(f"no decode instance {what} the prompt's {num_tokens} tokens (+ 1 to "
                                    f"decode into) within {core.cfg.admission_wait_s:.0f} s; retry later "
                                    f"(the last refusal: {refusal})")
                await asyncio.sleep(0.05)
                await self._refresh()
        finally:
            if queued:
                queued.release()

    async def _try_reserve(self, worker: WorkerHandle, prompt: list[int], max_tokens: int, layout,
                           local: bool = False):
        """``(landing descriptor, None, True)``, or ``(None, why, whether it was for KV room)``
        when the worker refused or failed. Raises InvalidRequest for a request it can never take."""
        try:
            landing = await worker.stub.Reserve(worker_pb2.ReserveRequest(
                request_id=self.req.request_id, num_prompt_tokens=len(prompt), max_tokens=max_tokens,
                prompt_token_ids=prompt,  # the decode instance reuses its cached prefix blocks
                local_prefill=local,      # it computes the prompt itself: nothing is pushed
                # the reservation lives as long as the request may; the push itself is bounded by
                # transfer_timeout_s from when it starts (a long prefill must not eat its budget)
                deadline_unix=self.req.deadline if self.req.deadline < float("inf") else 0.0,
                source_layout=layout), timeout=self._time_left(cap=10.0))
            self.core.directory.answered(worker)
            return landing, None, True
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                # the request is cancelled with its Reserve in flight: the worker may hold a
                # reservation nobody knows the transfer id of; free it by request id now
                self._abort_later(worker, request_id=self.req.request_id)
                raise
            self._excluded.add(worker.ident)  # its channel closed under the call
            return None, f"{worker.key}: the call was cancelled (its channel closed)", False
        except grpc.aio.AioRpcError as exc:
            why = f"{worker.key}: {exc.details() or exc.code().name}"
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.core.directory.answered(worker)
                return None, why, answered_as(exc) == NoKVRoom.__name__
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(exc.details()) from None
            if unreachable(exc):
                self.core.directory.failed_to_reach(worker, "reserve")
            else:
                self.core.directory.warn(worker.key, "reserve on %s failed: %s %s", worker.key,
                                         exc.code().name, exc.details())
            self._excluded.add(worker.ident)
            return None, why, False

    def _abort_later(self, decode: WorkerHandle, transfer_id: str = "", request_id: str = "") -> None:
        """Abort the reservation ``transfer_id``, or every one of ``request_id``, in the
        background (idempotent on the worker)."""
        async def abort() -> None:
            with contextlib.suppress(Exception):
                await decode.stub.Abort(worker_pb2.AbortRequest(transfer_id=transfer_id, request_id=request_id),
                                        timeout=5)
        self.core.background(asyncio.get_running_loop().create_task(abort()))

