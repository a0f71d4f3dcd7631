"""One request's ``RouterCore.generate`` run in a task of its own, its responses queued for the
front door that writes them to the client, up to a bound.

Who uses it: ``router.server.InferenceServicer.Generate`` (gRPC) and ``router.openai_api``
(HTTP, streamed or whole). The core's deadline (``asyncio.timeout``) and cancellation belong to
the one task that runs it, whichever task writes to the client, and the core keeps reading its
decode stream while the client is slow, so a worker's stream never waits on a client.

A client that stops reading (or reads slower than tokens are made) lets responses pile up here;
once ``limit`` wait unread and another is made, the request is ended inside the core with
``Exhausted`` (RESOURCE_EXHAUSTED): the core records it FAILED with that message, its decode
sequence is aborted and its KV blocks freed. The client gets the responses already queued and
then the error, whenever it reads again. Other requests are not touched, and nothing here ever
blocks the core's task: ``put_nowait`` on an unbounded queue whose length is checked first.
"""
from __future__ import annotations

import asyncio
import contextlib

from common.errors import Cancelled, Exhausted


class SlowClient(Exhausted):
    """The client left too many responses unread (``RouterConfig.stream_buffer``)."""


class Readahead:
    """``RouterCore.generate(...)`` in a task; :meth:`next` hands its responses over in order.

    ``limit``: responses that may wait unread before the request is ended (>= 1). :meth:`close`
    before the end cancels the request (recorded ``cancelled``, KV freed); call it always."""

    def __init__(self, stream, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a stream buffer holds at least 1 response, got {limit}")
        self._limit = limit
        self._cancelled = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(stream))

    async def _run(self, stream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for msg in stream:
                    # the last response (it carries the finish reason) always fits: a request that
                    # finished is never failed for its final message
                    if self._queue.qsize() >= self._limit and not getattr(msg, "finish_reason", 0):
                        rid = getattr(msg, "request_id", "") or "?"
                        # raised where the core waits for its reader: it records the failure and frees the KV
                        await stream.athrow(SlowClient(
                            f"request {rid} stopped: its client left {self._limit} responses unread (the router's "
                            f"--stream-buffer); read the stream as it arrives, or raise --stream-buffer"))
                    self._queue.put_nowait(msg)
            self._queue.put_nowait(None)
        except Exception as exc:
            self._queue.put_nowait(exc)
        except BaseException:   # cancelled (close(), cancel(), the loop ending): a waiting next() ends too
            self._queue.put_nowait(Cancelled("the request was cancelled"))
            raise

    async def next(self):
        """The next response, None after the last; raises the core's error (after the responses
        made before it)."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        """Cancel the request now (once: a second cancel would cut its cleanup short, leaving
        a decode reservation to the reaper), e.g. from the gRPC call's done callback; :meth:`close`
        still waits for the cleanup."""
        if not self._cancelled and not self._task.done():
            self._cancelled = True
            self._task.cancel()

    async def close(self) -> None:
        """Cancel the request unless it ended, and wait until its cleanup (state recorded, KV
        freed) is done. A cancellation of the caller itself still propagates."""
        self.cancel()
        await asyncio.wait({self._task})
