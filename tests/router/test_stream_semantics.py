"""Stream semantics through the router's real gRPC front door (issue 25): each request's tokens
in order and exact among 64 concurrent streams, one stream cancelled alone, and a client that
stops reading fails alone with a clear error while the others complete. (Failover mid-stream
with exact tokens: ``tests/router/test_fake_workers.py``.)"""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from cleave.v1 import inference_pb2 as pb
from cleave.v1 import inference_pb2_grpc
from common.grpc_util import add_service
from router.server import InferenceServicer
from tests.fake_stack import FakeStack


@contextlib.asynccontextmanager
async def front_door(stack: FakeStack, client_options=()):
    """The stack's router core behind a real gRPC server; yields a client stub."""
    server = grpc.aio.server()
    add_service(server, InferenceServicer(stack.core), pb.DESCRIPTOR.services_by_name["Inference"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(client_options))
    try:
        yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=None)


def request(rid: str, prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def read_all(call) -> list[int]:
    ids = []
    async for msg in call:
        ids.extend(msg.token_ids)
    return ids


def test_64_streams_are_each_exact_and_in_order_and_one_cancel_ends_only_its_own(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, decode_blocks=1200, prefill_blocks=400) as stack, \
                front_door(stack) as stub:
            prompts = {f"s{i}": [1 + i % 7, 2 + i, 3 + 2 * i] for i in range(64)}
            calls = {rid: stub.Generate(request(rid, p, 24)) for rid, p in prompts.items()}

            async def cancel_after_three(call):
                got = []
                while len(got) < 3:
                    got.extend((await call.read()).token_ids)
                call.cancel()
                return got
            victim = "s17"
            results = await asyncio.gather(*(cancel_after_three(c) if rid == victim else read_all(c)
                                             for rid, c in calls.items()))
            for (rid, prompt), ids in zip(prompts.items(), results):
                if rid == victim:
                    assert ids == stack.expected(prompt, 24)[:len(ids)]
                else:
                    assert ids == stack.expected(prompt, 24), rid
                    assert (await stack.record(rid))["state"] == "finished"
            rec = await stack.record(victim)
            assert rec["state"] == "cancelled" and rec["error"] == "client cancelled the request"
            assert all(free == total for free, total in (await stack.settle()).values())

    asyncio.run(main())


def test_a_client_that_stops_reading_fails_alone_with_a_clear_error(redis_url):
    """The slow client reads one response and stops; its HTTP/2 window (1 KiB here) fills, then
    the router's buffer (8 responses): the request ends RESOURCE_EXHAUSTED, recorded with the
    reason, its KV freed, while four other streams complete exactly. Reading again, the client
    gets what was queued, then the error."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, decode_blocks=1200,
                             stream_buffer=8, request_timeout_s=60.0) as stack:
            async with front_door(stack, client_options=[("grpc.http2.lookahead_bytes", 1024),
                                                         ("grpc.http2.bdp_probe", 0)]) as stub:
                slow_prompt, n = [5, 6, 7], 1800
                slow = stub.Generate(request("slow", slow_prompt, n))
                first = await slow.read()
                assert first.token_ids
                for _ in range(600):                 # the request fails once its buffer is full
                    rec = await stack.core.store.get("slow")
                    if rec.get("state") == "failed":
                        break
                    await asyncio.sleep(0.05)
                others = {f"o{i}": [9, i, 4] for i in range(4)}
                got = await asyncio.gather(*(read_all(stub.Generate(request(r, p, 40))) for r, p in others.items()))
                assert got == [stack.expected(p, 40) for p in others.values()]
                rec = await stack.record("slow")
                assert rec["state"] == "failed", rec
                assert "left 8 responses unread" in rec["error"] and "--stream-buffer" in rec["error"]
                assert all(free == total for free, total in (await stack.settle()).values())
                ids = list(first.token_ids)
                try:
                    while (msg := await slow.read()) is not grpc.aio.EOF:
                        ids.extend(msg.token_ids)
                    raise AssertionError("the slow stream must end with an error")
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "left 8 responses unread" in exc.details()
                assert 8 < len(ids) < n and ids == stack.expected(slow_prompt, n)[:len(ids)]

    asyncio.run(main())


def test_a_client_that_leaves_while_its_stream_is_stalled_cancels_at_once(redis_url):
    """The handler is blocked sending to a client that stopped reading; the client cancels. The
    request ends ``cancelled`` and frees its KV now, not after the buffer fills or the tokens run out."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, decode_blocks=1200, stream_buffer=1024) as stack:
            async with front_door(stack, client_options=[("grpc.http2.lookahead_bytes", 1024),
                                                         ("grpc.http2.bdp_probe", 0)]) as stub:
                call = stub.Generate(request("gone", [5, 6, 7], 1800))
                await call.read()
                await asyncio.sleep(0.5)              # the window fills; the handler blocks in a send
                call.cancel()
                rec = await stack.record("gone")
                assert rec["state"] == "cancelled", rec
                assert int(rec["completion_tokens"]) < 1800
                assert all(free == total for free, total in (await stack.settle()).values())

    asyncio.run(main())


class _Msg:
    def __init__(self, i: int, final: bool = False) -> None:
        self.request_id, self.token_ids, self.finish_reason = "r", [i], 1 if final else 0


def test_the_readahead_never_fails_a_request_for_its_final_response():
    from router.readahead import Readahead, SlowClient

    async def stream(n, final=True):
        try:
            for i in range(n):
                yield _Msg(i, final and i == n - 1)
        except SlowClient:
            raise

    async def drain(pump):
        out = []
        try:
            while (m := await pump.next()) is not None:
                out.append(m.token_ids[0])
        except SlowClient as exc:
            out.append(str(exc))
        await pump.close()
        return out

    async def main():
        full = Readahead(stream(4), limit=3)          # 3 wait unread, the 4th is the last: it fits
        await asyncio.sleep(0.05)
        assert await drain(full) == [0, 1, 2, 3]
        over = Readahead(stream(5, final=False), limit=3)
        await asyncio.sleep(0.05)
        got = await drain(over)
        assert got[:3] == [0, 1, 2] and "left 3 responses unread" in got[3]

    asyncio.run(main())


def test_a_cancel_while_the_reserve_is_in_flight_frees_that_reservation_at_once(redis_url, monkeypatch):
    """The decode worker makes the reservation after the router stopped waiting for it: the
    router aborts the request's reservations by request id, so the blocks come back now, not
    when the reaper finds the reservation past its deadline."""
    from services import decode
    real = decode.DecodeService.Reserve
    made = asyncio.Event()

    async def slow_reserve(self, request, context):   # reserves, then answers late
        out = await real(self, request, context)
        made.set()
        await asyncio.sleep(0.3)
        return out
    monkeypatch.setattr(decode.DecodeService, "Reserve", slow_reserve)

    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, request_timeout_s=300.0) as stack:
            task = asyncio.ensure_future(stack.generate([1, 2, 3, 4, 5], 8, request_id="mid-reserve"))
            await asyncio.sleep(0.1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(made.wait(), 5)
            assert all(free == total for free, total in (await stack.settle(timeout=5.0)).values())

    asyncio.run(main())
