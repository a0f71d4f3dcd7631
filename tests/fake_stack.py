"""An in-process serving stack on fake executors: router and service tests without a model.

:class:`FakeStack` starts, in the caller's event loop, ``prefill`` prefill and ``decode``
decode workers and a router core:

* each worker is the real ``PrefillService`` / ``DecodeService`` on a real gRPC server (a free
  port of 127.0.0.1), started by ``services.worker.start_worker`` and registered in Redis by
  its real heartbeat, as ``prefill-0``, ``prefill-1``, ... / ``decode-0``, ...;
* each worker runs a :class:`ScriptedExecutor` (``engine.runtime.fake.FakeExecutor`` plus
  faults a test scripts) whose KV moves between workers over a real TCP transport, wrapped in
  a :class:`ScriptedTransport` that can corrupt what it sends;
* the router is the real ``router.core.RouterCore``, discovering the workers through the same
  Redis (a byte-level tokenizer, ``tests.models.write_byte_tokenizer``).

Least-load ties go to the lowest worker id, so an idle stack sends a lone request to
``prefill-0`` and ``decode-0``. Usage (``redis_url``: the conftest fixture)::

    async with FakeStack(redis_url, prefill=2, decode=2, max_attempts=3) as stack:
        out = await stack.generate([1, 2, 3], max_tokens=8)
        assert out.token_ids == stack.expected([1, 2, 3], 8) and out.error is None
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import tempfile
import threading
import time
from typing import Callable

import torch

from cleave.v1 import inference_pb2 as pb
from common.config import RouterConfig
from common.errors import CleaveError
from common.flags import replace
from common.registry import connect_redis
from engine.runtime.fake import FakeExecutor, tiny_config
from engine.sampler import StepLogits
from kvtransfer.message import TRAILER
from kvtransfer.transport import KVTransport, make_transport
from router.core import RouterCore
from router.state import TERMINAL
from router.text import TextCodec
from services import decode, prefill
from services.config import WorkerConfig
from services.worker import RunningWorker, WorkerHost, start_worker

# router settings of a test stack (fast discovery, short deadlines); a test overrides any
ROUTER_DEFAULTS = dict(port=0, http_port=0, discovery_s=0.1, request_timeout_s=20.0, transfer_timeout_s=5.0,
                       admission_wait_s=2.0)


class ScriptedTransport(KVTransport):
    """A KV transport (``inner``) that adds 1.0 to every KV element of its next ``corrupt``
    sends, after the sender wrote the message's checksum: a receiver that checks checksums
    refuses the piece, one that does not lands KV that decodes to other tokens. Float32 KV
    (the fake model's) only. ``corrupted`` counts the sends it altered."""

    name = "scripted"

    def __init__(self, inner: KVTransport) -> None:
        self.inner = inner
        self.corrupt = 0
        self.corrupted = 0

    def address(self) -> bytes:
        return self.inner.address()

    def post_recv(self, tag: int, buffer: torch.Tensor, deadline: float):
        return self.inner.post_recv(tag, buffer, deadline)

    def send(self, peer: bytes, tag: int, buffer: torch.Tensor, deadline: float):
        if self.corrupt > 0:
            self.corrupt -= 1
            self.corrupted += 1
            buffer[:-TRAILER.size].view(torch.float32).add_(1.0)   # payload; the trailer stays
        return self.inner.send(peer, tag, buffer, deadline)

    def close(self) -> None:
        self.inner.close()


class ScriptedExecutor(FakeExecutor):
    """:class:`FakeExecutor` with faults a test scripts (from any thread):

    * ``fault`` (inherited): every forward raises it;
    * :meth:`fail_after`: ``n`` more forwards succeed, then every one raises ``exc`` (the
      first failing one waits for ``gate`` first, when given: a test sets it once the client
      holds the tokens streamed so far, so the fault lands at a known point of the stream);
    * ``poison``: a token id; every logits row whose last input token is ``poison`` is NaN,
      a failure of that request alone, the same on every worker (set it on all of them).

    Its transport is a :class:`ScriptedTransport` over the config's (``transport``)."""

    def __init__(self, cfg, on_failure=None, model_config=None) -> None:
        self.transport = ScriptedTransport(make_transport(cfg.transport, host=cfg.host))
        super().__init__(cfg, on_failure, model_config=model_config, transport=self.transport)
        self.poison: int | None = None
        self.stall = 0.0                     # seconds every forward sleeps first (a slow worker)
        self._fail_at: tuple[int, Exception, threading.Event | None] | None = None

    def fail_after(self, n: int, exc: Exception, gate: threading.Event | None = None) -> None:
        self._fail_at = (self.forwards + n, exc, gate)

    def forward(self, batch):
        if self.stall:
            time.sleep(self.stall)
        if self._fail_at is not None and self.forwards >= self._fail_at[0]:
            _, exc, gate = self._fail_at
            if gate is not None and not gate.wait(10.0):
                raise TimeoutError("fail_after: the test never opened the gate")
            self.fault, self._fail_at = exc, None
        logits = super().forward(batch)
        if self.poison is not None:
            bad = batch.input_ids[batch.logits_indices] == self.poison
            if isinstance(logits, StepLogits):     # a reduced decode step: its rows' max is NaN
                logits.best[bad] = float("nan")
                logits.logits[bad[logits.rows]] = float("nan")
            else:
                logits[bad] = float("nan")
        return logits


@dataclasses.dataclass
class Output:
    """What one :meth:`FakeStack.generate` call saw: the tokens streamed (before an error, if
    any), the finish reason, the error ``RouterCore.generate`` raised (None when it finished)
    and the request's Redis hash once the router wrote its final state."""

    token_ids: list[int]
    finish_reason: int | None
    error: CleaveError | None
    record: dict[str, str]
    messages: list = dataclasses.field(default_factory=list)  # every GenerateResponse received


class FakeStack:
    """The stack of the module docstring. ``prefill_blocks`` / ``decode_blocks``: KV blocks
    of ``block_size`` tokens per worker (block 0 is never handed out); ``checksum``: CRC on
    every KV message; ``heartbeat_s``: how often workers rewrite their Redis record;
    ``router``: ``RouterConfig`` fields over :data:`ROUTER_DEFAULTS`. Raises ``ValueError``
    for a bad count or config."""

    def __init__(self, redis_url: str, prefill: int = 2, decode: int = 2, *, vocab: int = 512,
                 block_size: int = 4, prefill_blocks: int = 64, decode_blocks: int = 64,
                 checksum: bool = True, heartbeat_s: float = 0.2, worker: dict | None = None, **router) -> None:
        if prefill < 0 or decode < 1:
            raise ValueError(f"a stack needs >= 0 prefill and >= 1 decode worker, got {prefill} and {decode}")
        self.redis_url = redis_url
        self.model = tiny_config(vocab=vocab)
        self.router_cfg = RouterConfig(redis_url=redis_url, **{**ROUTER_DEFAULTS, **router})
        common = dict(redis_url=redis_url, key_prefix=self.router_cfg.key_prefix, block_size=block_size,
                      transport="tcp", checksum=checksum, heartbeat_s=heartbeat_s, ttl_s=max(5.0, 4 * heartbeat_s),
                      **(worker or {}))
        self.worker_cfgs = [replace(WorkerConfig(pool="prefill"), worker_id=f"prefill-{i}", num_blocks=prefill_blocks,
                                    **common) for i in range(prefill)]
        self.worker_cfgs += [replace(WorkerConfig(pool="decode"), worker_id=f"decode-{i}", num_blocks=decode_blocks,
                                     **common) for i in range(decode)]
        self.prefills: list[RunningWorker] = []
        self.decodes: list[RunningWorker] = []
        self.core: RouterCore | None = None
        self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="fake-stack-tok-")

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> "FakeStack":
        for cfg in self.worker_cfgs:
            (self.prefills if cfg.pool == "prefill" else self.decodes).append(await self._start_worker(cfg))
        self.core = RouterCore(self.router_cfg, "fake-model", self.model, await asyncio.to_thread(self._codec),
                               connect_redis(self.redis_url))
        await self.core.start()
        return self

    async def _start_worker(self, cfg: WorkerConfig) -> RunningWorker:
        servicer, add = {"prefill": (prefill.PrefillService, prefill.add_to_server),
                         "decode": (decode.DecodeService, decode.add_to_server)}[cfg.pool]
        make = functools.partial(ScriptedExecutor, model_config=self.model)
        return await start_worker(WorkerHost(cfg, make=make), servicer, add)

    # ---- chaos -------------------------------------------------------------------------------
    async def vanish(self, pool: str, index: int, seconds: float) -> None:
        """Delete a worker's registry record and hold its heartbeat for ``seconds`` (a registry
        blip: a Redis restart, a missed TTL); the worker itself keeps serving."""
        worker = (self.prefills if pool == "prefill" else self.decodes)[index]
        worker._beat_task.cancel()
        await worker.heartbeat.deregister()
        await asyncio.sleep(seconds)
        worker._beat_task = asyncio.create_task(worker.heartbeat.run())

    async def kill(self, pool: str, index: int) -> None:
        """Stop a worker as kill -9 would: no drain and no deregistration (its record lives out
        its TTL), calls in flight cut."""
        worker = (self.prefills if pool == "prefill" else self.decodes)[index]
        worker._beat_task.cancel()
        worker._beat_task = None
        if worker._kv_task is not None:       # nor KV events: its snapshot lives out its TTL
            worker._kv_task.cancel()
            worker._kv_task = None
            await worker._events_client.aclose()
        await worker._client.aclose()
        await worker.server.stop(grace=None)
        await worker.servicer.stop()
        worker.host.executor.close()

    async def restart(self, pool: str, index: int) -> None:
        """Start a killed worker again: a new incarnation of the same worker id."""
        into = self.prefills if pool == "prefill" else self.decodes
        into[index] = await self._start_worker(into[index].host.cfg)

    def _codec(self) -> TextCodec:
        from transformers import AutoTokenizer

        from tests.models import write_byte_tokenizer
        write_byte_tokenizer(self._tokenizer_dir.name)
        return TextCodec(AutoTokenizer.from_pretrained(self._tokenizer_dir.name))

    async def close(self) -> None:
        if self.core is not None:
            await self.core.close()
        for worker in self.prefills + self.decodes:
            await worker.stop(grace=None)
        self._tokenizer_dir.cleanup()

    async def __aenter__(self) -> "FakeStack":
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- requests ----------------------------------------------------------------------------
    def expected(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The tokens every worker of this stack gives ``prompt`` (greedy, no EOS)."""
        return FakeExecutor.expected(prompt, max_tokens, self.model.vocab_size)

    async def generate(self, prompt: list[int], max_tokens: int, request_id: str = "",
                       timeout_s: float | None = None,
                       on_tokens: Callable[[list[int]], None] | None = None, **sampling) -> Output:
        """Run one request through ``RouterCore.generate`` (token ids in, ``ignore_eos`` unless
        given); a ``CleaveError`` is returned in :attr:`Output.error`, not raised.
        ``on_tokens(all tokens so far)`` is called after each delta the client receives."""
        sampling.setdefault("ignore_eos", True)
        request = pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))
        ids, finish, error, rid, messages = [], None, None, request_id, []
        try:
            async with contextlib.aclosing(self.core.generate(request, timeout_s)) as stream:
                async for msg in stream:
                    messages.append(msg)
                    ids.extend(msg.token_ids)
                    rid = msg.request_id
                    if on_tokens is not None:
                        on_tokens(list(ids))
                    finish = msg.finish_reason or finish
        except CleaveError as exc:
            error = exc
        return Output(ids, finish, error, await self.record(rid) if rid else {}, messages)

    async def record(self, request_id: str, timeout: float = 5.0) -> dict[str, str]:
        """The request's Redis hash once the router's writer task wrote a terminal state (the
        last write of a request), or as it is after ``timeout`` s. (Calling
        ``RequestStore.flush`` here instead would race the writer task: two pipelines in
        flight may land out of order.)"""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.core.store.get(request_id)
            if record.get("state") in TERMINAL or time.monotonic() > deadline:
                return record
            await asyncio.sleep(0.01)

    # ---- inspection ----------------------------------------------------------------------------
    def executor(self, pool: str, index: int) -> ScriptedExecutor:
        return (self.prefills if pool == "prefill" else self.decodes)[index].host.executor

    def executors(self) -> list[ScriptedExecutor]:
        return [w.host.executor for w in self.prefills + self.decodes]

    def free_blocks(self) -> dict[str, tuple[int, int]]:
        """``{worker_id: (available blocks, total blocks)}`` from each worker's block manager
        (available: free or cached, held by nobody; equal to the total once nothing is held)."""
        return {w.host.worker_id: (w.host.blocks.available_blocks, w.host.blocks.total)
                for w in self.prefills + self.decodes}

    async def settle(self, timeout: float = 5.0) -> dict[str, tuple[int, int]]:
        """Wait (up to ``timeout`` s) until every worker's blocks are free again and the router
        counts nothing in flight (aborts of reservations run in the background); returns
        :meth:`free_blocks` then, for the test to assert on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._idle():
            await asyncio.sleep(0.02)
        return self.free_blocks()

    def _idle(self) -> bool:
        handles = self.core.directory.pool("prefill") + self.core.directory.pool("decode")
        return (all(free == total for free, total in self.free_blocks().values())
                and all(h.inflight == 0 and h.inflight_tokens == 0 for h in handles))
