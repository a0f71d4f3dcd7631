"""The router's end of the decode instances' ``Tokens`` streams (``router.token_streams``).

Against a real decode worker over real gRPC (``tests.services.test_local_prefill``'s, fake model):
one stream per worker whatever the number of requests opening it at once; a waiter leaving does
not fail the others; a stream that ends fails the requests registered on it with a retryable
status marked as answered (the worker is not "unreachable" for it), and is forgotten.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest

from common.errors import answered_as
from router.token_streams import TokenStreams
from router.workers import unreachable
from tests.services.test_local_prefill import decode_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class Handle:
    """What ``TokenStreams`` reads of a ``router.workers.WorkerHandle``."""

    stub: object
    ident: tuple = ("127.0.0.1:0", "incarnation-1")
    key: str = "decode/test"


async def next_error(queue: asyncio.Queue) -> BaseException:
    item = await asyncio.wait_for(queue.get(), 5.0)
    assert isinstance(item, BaseException), item
    return item


def test_concurrent_requests_share_one_stream_and_a_waiter_leaving_fails_none():
    async def main():
        async with decode_worker() as (worker, stub):
            streams, handle = TokenStreams(), Handle(stub)
            leaving = asyncio.create_task(streams.of(handle))
            staying = [asyncio.create_task(streams.of(handle)) for _ in range(7)]
            await asyncio.sleep(0)
            leaving.cancel()
            opened = await asyncio.gather(*staying)
            assert len({id(s) for s in opened}) == 1 and not opened[0].closed
            assert len(worker.servicer.streams._streams) == 1       # one Tokens call on the worker
            assert await streams.of(handle) is opened[0]            # reused while open
            await streams.close()
            assert opened[0].closed
    asyncio.run(main())


def test_a_stream_that_ends_fails_its_requests_retryably_and_is_reopened_later():
    async def main():
        async with decode_worker() as (worker, stub):
            streams, handle = TokenStreams(), Handle(stub)
            stream = await streams.of(handle)
            queue = stream.register("t-1")
            worker.servicer.streams.close()          # the worker ends it (stopping)
            error = await next_error(queue)
            assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
            assert answered_as(error) == "TokenStreamEnded" and not unreachable(error)
            assert stream.closed and streams._streams == {}         # forgotten: the next request reopens
            late = stream.register("t-2")                            # registered after the end
            assert answered_as(await next_error(late)) == "TokenStreamEnded"
            worker.servicer.streams._closing = False                 # the worker takes streams again
            assert await streams.of(handle) is not stream
            await streams.close()
    asyncio.run(main())


def test_a_stream_the_worker_refuses_raises_its_status_to_every_waiter():
    async def main():
        async with decode_worker() as (worker, stub):
            worker.servicer.streams.close()          # refuses new streams
            streams, handle = TokenStreams(), Handle(stub)
            results = await asyncio.gather(*(streams.of(handle) for _ in range(3)), return_exceptions=True)
            for r in results:
                assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
                assert "stopping" in r.details() and answered_as(r) == "Unavailable"
            assert streams._streams == {} and streams._opening == {}
            await streams.close()
    asyncio.run(main())
