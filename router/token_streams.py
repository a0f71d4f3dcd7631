"""The router's end of the decode instances' ``Tokens`` streams: one per decode worker incarnation.

A decode step over B sequences of this router arrives as one ``TokenBatch`` message on one
stream (``services.decode_stream``), instead of B messages on B calls. :class:`TokenStream`
reads it in one task and hands each ``DecodeChunk`` to the queue of the request it belongs to
(by transfer id); a request reads its chunks with :meth:`TokenStream.chunks`.

Who calls what: ``router.lifecycle.RequestRun`` gets the worker's stream from
:meth:`TokenStreams.of` (opened on first use, reopened after it ends), registers its transfer
id *before* its ``Decode`` call names the stream (chunks can arrive before the call's reply),
and hands the call to :meth:`TokenStream.watch`, which puts the call's error status into the
same queue: the request sees chunks and failures in one place, as ``_rpc`` expects of a call.
The ``Decode`` call stays the request's own: cancelling it aborts the sequence on the worker.

A sequence's failure comes on the stream too, after its last tokens (``SequenceFailure``), and
is raised as the ``grpc.aio.AioRpcError`` its own call would have raised (same code, message
and trailers), so the router treats it as before. A stream that ends or breaks fails every
request reading it with its status (``UNAVAILABLE``, marked answered, when it ended cleanly),
so they retry on other workers like a broken call; the next request opens a new stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import grpc

from cleave.v1 import worker_pb2
from common.errors import answered_error

log = logging.getLogger(__name__)


OPEN_TIMEOUT_S = 10.0   # a stream not open by then is retried elsewhere (shared by every request waiting)


def _ended(details: str) -> grpc.aio.AioRpcError:
    """The status a request sees when its stream ended (or would not open) without a status
    of its own: retryable, and marked as answered (the worker is not unreachable for it)."""
    return answered_error(grpc.StatusCode.UNAVAILABLE, details, "TokenStreamEnded")


def _failure(failure: worker_pb2.SequenceFailure) -> grpc.aio.AioRpcError:
    """A sequence's failure sent on the stream, as its own Decode call would have raised it."""
    code = next((c for c in grpc.StatusCode if c.value[0] == failure.code), grpc.StatusCode.UNKNOWN)
    return answered_error(code, failure.message, failure.error_type, failure.request_fault)


def _copy(error: BaseException) -> BaseException:
    """One exception object per request (raised in each request's own task)."""
    if isinstance(error, grpc.aio.AioRpcError):
        return grpc.aio.AioRpcError(error.code(), error.initial_metadata(), error.trailing_metadata(),
                                    error.details(), error.debug_error_string())
    return type(error)(*error.args)


class TokenStream:
    """This router's ``Tokens`` stream from one decode worker incarnation (``key`` names it in logs)."""

    def __init__(self, stub, key: str, on_close=None) -> None:
        self.id = uuid.uuid4().hex
        self.key = key
        self._stub = stub
        self._on_close = on_close      # called once when the stream ends
        self._queues: dict[str, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self.closed = False

    async def open(self, timeout: float) -> None:
        """Open the stream and wait for its first (empty) message: from then on ``Decode`` calls
        may name it. Raises the call's ``grpc.aio.AioRpcError`` (or CancelledError)."""
        call = self._stub.Tokens(worker_pb2.TokensRequest(stream_id=self.id))
        messages = aiter(call)
        try:
            async with asyncio.timeout(timeout):
                await anext(messages)
        except TimeoutError:
            call.cancel()
            raise _ended(f"{self.key}: its token stream did not open within {timeout:.1f} s") from None
        except StopAsyncIteration:
            raise _ended(f"{self.key}: its token stream ended as it opened") from None
        except BaseException:
            call.cancel()
            raise
        self._task = asyncio.get_running_loop().create_task(self._pump(call, messages))

    async def _pump(self, call, messages) -> None:
        queues = self._queues
        error: BaseException = _ended(f"{self.key}: its token stream ended")
        try:
            async for batch in messages:
                for item in batch.chunks:
                    queue = queues.get(item.transfer_id)
                    if queue is None:
                        continue
                    if item.HasField("chunk"):
                        queue.put_nowait(item.chunk)
                    if item.HasField("failure"):
                        queue.put_nowait(_failure(item.failure))
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:    # the router closing, or the channel closed under the call
            error = asyncio.CancelledError()
            raise
        except Exception as exc:          # a defect here: fail the requests, say why
            log.exception("reading the token stream from %s failed", self.key)
            error = _ended(f"{self.key}: reading its token stream failed: {exc}")
        finally:
            self.closed = True
            call.cancel()
            if self._on_close is not None:
                self._on_close(self)
            for queue in queues.values():
                queue.put_nowait(_copy(error))
            if not isinstance(error, asyncio.CancelledError) and queues:
                log.warning("token stream from %s ended with %d requests reading it: %s", self.key, len(queues),
                            error.details() if isinstance(error, grpc.aio.AioRpcError) else error)

    def register(self, transfer_id: str) -> asyncio.Queue:
        """The queue the chunks of ``transfer_id`` go to (register before its Decode call)."""
        queue = self._queues[transfer_id] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(_ended(f"{self.key}: its token stream ended"))
        return queue

    def unregister(self, transfer_id: str) -> None:
        self._queues.pop(transfer_id, None)

    def watch(self, transfer_id: str, call) -> asyncio.Task:
        """A task that waits for ``call`` (the request's ``Decode``, which sends no message) to
        end and puts its failure, if any, into the request's queue (a failure before the
        sequence ran, or the stream ending). Cancel it when done."""
        queue = self._queues[transfer_id]

        async def wait() -> None:
            try:
                async for _ in call:
                    pass
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                queue.put_nowait(exc if isinstance(exc, grpc.aio.AioRpcError) else asyncio.CancelledError())
        return asyncio.get_running_loop().create_task(wait())

    @staticmethod
    async def chunks(queue: asyncio.Queue):
        """The request's ``DecodeChunk``s, in order; raises what its call or the stream failed with."""
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class TokenStreams:
    """The router's open token streams, one per decode worker incarnation (event loop only)."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], TokenStream] = {}
        self._opening: dict[tuple[str, str], asyncio.Future] = {}

    async def of(self, worker, timeout: float = OPEN_TIMEOUT_S) -> TokenStream:
        """The open stream from ``worker`` (a ``router.workers.WorkerHandle``), opening one when
        there is none (concurrent callers share one opening, bounded by ``timeout``; a request's
        own deadline bounds its wait through ``RouterCore.generate``'s timeout). Raises the
        opening's error (a copy per caller)."""
        key = worker.ident
        stream = self._streams.get(key)
        if stream is not None and not stream.closed:
            return stream
        opening = self._opening.get(key)
        if opening is None:
            opening = self._opening[key] = asyncio.get_running_loop().create_task(self._open(worker, timeout))
            opening.add_done_callback(self._opened)
        try:
            return await asyncio.shield(opening)
        except grpc.aio.AioRpcError as exc:     # one object per waiting request
            raise _copy(exc) from None

    async def _open(self, worker, timeout: float) -> TokenStream:
        stream = TokenStream(worker.stub, worker.key, on_close=self._forget)
        await stream.open(timeout)
        self._streams[worker.ident] = stream
        return stream

    def _opened(self, task: asyncio.Task) -> None:
        self._opening = {k: t for k, t in self._opening.items() if t is not task}
        if not task.cancelled():
            task.exception()     # retrieved here too: every waiter may have left

    def _forget(self, stream: TokenStream) -> None:
        self._streams = {k: s for k, s in self._streams.items() if s is not stream}

    async def close(self) -> None:
        openings = list(self._opening.values())
        for opening in openings:
            opening.cancel()
        await asyncio.gather(*openings, return_exceptions=True)
        for stream in list(self._streams.values()):
            with contextlib.suppress(Exception):
                await stream.close()
        self._streams.clear()
