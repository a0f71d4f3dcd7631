"""How a decode instance's tokens leave it: per ``Decode`` call, or one ``Tokens`` stream per caller.

The scheduler thread emits ``(token, reason, logprob)`` per sequence per step; the relay
(``services.token_relay``) hands them to the event loop, once per burst. From there:

* :class:`SequenceOutput` turns one sequence's emitted items into the ``DecodeChunk`` the
  caller sees and, when the sequence ended badly, the error its ``Decode`` call ends with. Both
  delivery modes use it, so a chunk is the same whichever way it travels.
* :class:`TokenStreams` holds the open ``Tokens`` streams (``DecodeService.Tokens``). A
  ``Decode`` naming a stream binds its sequence to it; every chunk made since the stream's last
  message goes out in one ``TokenBatch``, so a step over B sequences of one router costs one
  gRPC message instead of B. A sequence's failure travels the same way (``SequenceFailure``,
  in the message with its last tokens), so nothing it made before failing is lost or
  overtaken. The ``Decode`` call itself stays open without messages (its cancellation still
  aborts the sequence) and ends OK once the sequence's last message was sent. A stream that
  ends (the router left, or its call broke) ends every sequence bound to it, so none decodes
  for nobody.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from cleave.v1 import inference_pb2, worker_pb2
from common.errors import CleaveError, Exhausted, RequestFault, Unavailable, status_of
from engine.scheduler import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, Sequence
from services.worker import logprob_pb

log = logging.getLogger(__name__)

_FINISH = {FINISH_LENGTH: inference_pb2.FINISH_REASON_LENGTH}
_FAULTS = {"request": RequestFault, "capacity": Exhausted}


class SequenceOutput:
    """One sequence's items → chunks. ``first_extra``: fields of the first chunk with a token
    (a local prefill's ``cached_tokens`` and ``prefill_seconds``), given by ``on_first``, which
    is called once, when that chunk is made; ``where``: names the sequence in error messages."""

    def __init__(self, seq: Sequence, where: str, on_first: Callable[[], dict] | None = None) -> None:
        self.seq = seq
        self.where = where
        self._on_first = on_first

    def chunk(self, items: list[tuple]) -> tuple[worker_pb2.DecodeChunk | None, CleaveError | None, bool]:
        """``(chunk, error, ended)`` for the items emitted since the last call: the chunk (None
        when a failure came with no token), the error the sequence ended with (None: none) and
        whether it ended (finished or failed)."""
        tokens = [t for t, _, _ in items if t is not None]
        logprobs = [logprob_pb(lp) for t, _, lp in items if t is not None and lp is not None]
        reason = next((r for _, r, _ in items if r is not None), None)
        extra = {}
        if self._on_first is not None and tokens:
            extra, self._on_first = self._on_first(), None
        if reason in (FINISH_ABORT, FINISH_ERROR):
            kind = _FAULTS.get(self.seq.fault, Unavailable)
            error = kind(f"decode of {self.where} ended: {self.seq.error or 'aborted'}")
            # tokens made before the failure: the router keeps them and resumes after
            return (worker_pb2.DecodeChunk(token_ids=tokens, logprobs=logprobs, **extra) if tokens else None), error, True
        chunk = worker_pb2.DecodeChunk(
            token_ids=tokens, logprobs=logprobs, finished=reason is not None,
            finish_reason=_FINISH.get(reason, inference_pb2.FINISH_REASON_STOP) if reason else 0, **extra)
        return chunk, None, reason is not None


def failure_pb(error: CleaveError) -> worker_pb2.SequenceFailure:
    """A sequence's error as the stream carries it (the status its own Decode call would end with)."""
    code, message = status_of(error)
    return worker_pb2.SequenceFailure(code=code.value[0], message=message, error_type=type(error).__name__,
                                      request_fault=isinstance(error, RequestFault))


class _Stream:
    """One open ``Tokens`` stream: the items its sequences emitted since its last message."""

    def __init__(self) -> None:
        self.pending: dict[str, list[tuple]] = {}          # transfer id -> items, in order of first item
        self.bound: dict[str, tuple[SequenceOutput, asyncio.Future]] = {}
        self.wake = asyncio.Event()

    def deliver(self, transfer_id: str) -> Callable[[tuple], None]:
        def put(item: tuple) -> None:
            self.pending.setdefault(transfer_id, []).append(item)
            self.wake.set()
        return put

    def batch(self) -> tuple[worker_pb2.TokenBatch, list[asyncio.Future]]:
        """The message for everything pending, and the ``ended`` futures of the sequences it
        ends (resolve them once it is sent). A sequence whose items cannot be turned into a
        chunk fails alone, in the message."""
        pending, self.pending = self.pending, {}
        batch, ended = worker_pb2.TokenBatch(), []
        for transfer_id, items in pending.items():
            output, done_future = self.bound.get(transfer_id, (None, None))
            if output is None:
                continue             # unbound (its Decode call ended): nobody reads it
            try:
                chunk, error, done = output.chunk(items)
            except Exception as exc:  # this sequence's output alone
                log.exception("building the chunk of %s failed", transfer_id)
                chunk, error, done = None, Unavailable(f"decode of {output.where}: its output failed: {exc}"), True
            if chunk is None and error is None:
                continue
            item = batch.chunks.add(transfer_id=transfer_id)
            if chunk is not None:
                item.chunk.CopyFrom(chunk)
            if error is not None:
                item.failure.CopyFrom(failure_pb(error))
            if done:
                ended.append(done_future)
        return batch, ended


class TokenStreams:
    """The ``Tokens`` streams open on one decode instance, by stream id (event loop only)."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._closing = False

    def close(self) -> None:
        """End every stream after its pending message (the server is stopping: nothing is bound
        once the worker drained) and refuse new ones."""
        self._closing = True
        for stream in self._streams.values():
            stream.wake.set()

    def bind(self, stream_id: str, transfer_id: str, output: SequenceOutput) -> tuple[Callable[[tuple], None],
                                                                                     asyncio.Future]:
        """``(deliver, ended)``: the relay's sink for the sequence's items, and a future resolved
        to None once its last message (its last tokens, its failure if any) was sent, or to
        Unavailable when the stream ended first. Raises Unavailable when no stream
        ``stream_id`` is open."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise Unavailable(f"token stream {stream_id!r} is not open on this instance (it ended); "
                              f"open a Tokens stream and name it in Decode")
        ended = asyncio.get_running_loop().create_future()
        stream.bound[transfer_id] = (output, ended)
        return stream.deliver(transfer_id), ended

    def unbind(self, stream_id: str, transfer_id: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.bound.pop(transfer_id, None)
            stream.pending.pop(transfer_id, None)

    async def serve(self, stream_id: str):
        """The messages of stream ``stream_id``: an empty one at once, then one per burst of
        tokens. Raises Unavailable when the id is empty or already open, or the instance is stopping."""
        if not stream_id:
            raise Unavailable("a Tokens stream needs a stream_id")
        if stream_id in self._streams:
            raise Unavailable(f"token stream {stream_id!r} is already open; pick a new id")
        if self._closing:
            raise Unavailable("this decode instance is stopping; open a token stream on another one")
        stream = self._streams[stream_id] = _Stream()
        try:
            yield worker_pb2.TokenBatch()
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                closing = self._closing     # seen before the batch: what is pending now goes out
                batch, ended = stream.batch()
                if batch.chunks:
                    yield batch
                for future in ended:        # after the message went out: its Decode call may end
                    if not future.done():
                        future.set_result(None)
                if closing:                 # sequences still bound end below (the server is stopping)
                    return
        finally:
            del self._streams[stream_id]
            for _, future in stream.bound.values():
                if not future.done():
                    future.set_result(Unavailable(f"token stream {stream_id!r} ended"))
