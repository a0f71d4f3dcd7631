"""A decode instance's ``Tokens`` stream (issue 25): one message per step for all of a caller's sequences.

A real ``DecodeService`` on a real gRPC server over the fake model (``tests.fake_stack``),
requests locally prefilled so no KV push is needed. Each test compares the tokens with
``FakeExecutor.expected`` (and with the per-call stream) and checks that every block is back.
"""
from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from cleave.v1 import worker_pb2
from tests.services.test_local_prefill import decode_request, decode_worker, expected, idle, reserve, tokens_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def open_stream(stub):
    """(stream id, call, message iterator) of an open Tokens stream (its empty first message read)."""
    stream_id = uuid.uuid4().hex
    call = stub.Tokens(worker_pb2.TokensRequest(stream_id=stream_id))
    messages = aiter(call)
    first = await anext(messages)
    assert not first.chunks
    return stream_id, call, messages


async def start(stub, stream_id: str, prompt: list[int], n: int, rid: str):
    """Reserve and start a locally prefilled sequence on the stream: (transfer id, its Decode call)."""
    landing = await reserve(stub, prompt, n, rid)
    request = decode_request(landing, prompt)
    request.stream_id = stream_id
    return landing.transfer_id, stub.Decode(request)


def test_one_message_carries_every_sequences_tokens_and_each_stream_is_exact():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            stream_id, call, messages = await open_stream(stub)
            prompts = {f"r{i}": [(7 * i + j) % 400 + 3 for j in range(5 + i)] for i in range(8)}
            n = 12
            calls = {}
            for rid, prompt in prompts.items():
                transfer_id, decode_call = await start(stub, stream_id, prompt, n, rid)
                calls[transfer_id] = (rid, decode_call)
            got = {t: [] for t in calls}
            finished, batches, shared = set(), 0, 0
            while len(finished) < len(calls):
                batch = await anext(messages)
                batches += 1
                shared += len(batch.chunks) > 1
                seen = [c.transfer_id for c in batch.chunks]
                assert len(seen) == len(set(seen))               # at most one chunk per sequence
                for item in batch.chunks:
                    assert item.transfer_id not in finished      # nothing after the last chunk
                    got[item.transfer_id] += item.chunk.token_ids
                    if item.chunk.finished:
                        finished.add(item.transfer_id)
            for transfer_id, (rid, decode_call) in calls.items():
                assert got[transfer_id] == expected(prompts[rid], n), rid
                assert [m async for m in decode_call] == []     # the call sends nothing, ends OK
                assert await decode_call.code() == grpc.StatusCode.OK
            assert shared > 0                      # sequences stepped together share messages
            assert batches < len(calls) * n        # fewer messages than one per sequence per token
            call.cancel()
            assert await idle(worker)
    asyncio.run(main())


def test_a_decode_naming_no_open_stream_is_refused_and_frees_its_reservation():
    async def main():
        async with decode_worker() as (worker, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await start_and_drain(stub, "never-opened")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not open" in err.value.details()
            assert await idle(worker)
    asyncio.run(main())


async def start_and_drain(stub, stream_id: str):
    _, call = await start(stub, stream_id, [3, 4, 5, 6, 7], 4, "r")
    return [m async for m in call]


def test_a_stream_id_already_open_is_refused():
    async def main():
        async with decode_worker() as (_, stub):
            stream_id, call, _ = await open_stream(stub)
            twin = stub.Tokens(worker_pb2.TokensRequest(stream_id=stream_id))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await anext(aiter(twin))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "already open" in err.value.details()
            call.cancel()
    asyncio.run(main())


def test_ending_the_stream_ends_its_sequences_and_frees_their_blocks():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            worker.host.executor.stall = 0.02            # the sequences are still running when it ends
            stream_id, call, messages = await open_stream(stub)
            decodes = [(await start(stub, stream_id, [9, 8, 7, 6 + i], 200, f"r{i}"))[1] for i in range(3)]
            await anext(messages)                        # tokens flow
            call.cancel()
            for decode_call in decodes:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in decode_call]
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "token stream" in err.value.details() and "ended" in err.value.details()
            assert await idle(worker)
    asyncio.run(main())


def test_cancelling_one_decode_call_ends_only_that_sequence():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            worker.host.executor.stall = 0.005
            stream_id, call, messages = await open_stream(stub)
            prompts = [[11, 12, 13, 14 + i] for i in range(3)]
            started = [await start(stub, stream_id, p, 40, f"r{i}") for i, p in enumerate(prompts)]
            (gone, gone_call), keep = started[1], [started[0], started[2]]
            got = {t: [] for t, _ in started}
            ended = set()
            batch = await anext(messages)
            gone_call.cancel()
            while True:
                for item in batch.chunks:
                    got[item.transfer_id] += item.chunk.token_ids
                    if item.chunk.finished:
                        ended.add(item.transfer_id)
                if len(ended) == 2:
                    break
                batch = await anext(messages)
            assert ended == {t for t, _ in keep}
            for i in (0, 2):
                assert got[started[i][0]] == expected(prompts[i], 40)
            assert len(got[gone]) < 40
            call.cancel()
            assert await idle(worker)
    asyncio.run(main())


def test_a_sequence_failure_comes_on_the_stream_after_its_tokens_and_the_call_ends_ok():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            stream_id, call, messages = await open_stream(stub)
            prompt = [21, 22, 23, 24]
            worker.host.executor.fail_after(6, RuntimeError("device lost"))
            transfer_id, decode_call = await start(stub, stream_id, prompt, 30, "r")
            got, failure = [], None
            while failure is None:
                for item in (await anext(messages)).chunks:
                    assert item.transfer_id == transfer_id
                    got += item.chunk.token_ids
                    if item.HasField("failure"):
                        failure = item.failure
            assert got == expected(prompt, 30)[:len(got)] and len(got) >= 5   # every token made before it
            assert failure.code == grpc.StatusCode.UNAVAILABLE.value[0] and "device lost" in failure.message
            assert (failure.error_type, failure.request_fault) == ("Unavailable", False)
            assert [m async for m in decode_call] == [] and await decode_call.code() == grpc.StatusCode.OK
            call.cancel()
            assert await idle(worker)
    asyncio.run(main())


def test_a_request_fault_comes_on_the_stream_marked_as_the_requests_own():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            stream_id, call, messages = await open_stream(stub)
            prompt = [41, 42, 43]
            poison = expected(prompt, 4)[3]     # the 4th token's row is NaN: its own fault alone
            worker.host.executor.poison = poison
            landing = await reserve(stub, prompt, 10, "poisoned")
            request = decode_request(landing, prompt, logprobs=True, top_logprobs=2)
            request.stream_id = stream_id
            decode_call = stub.Decode(request)
            got, failure = [], None
            while failure is None:
                for item in (await anext(messages)).chunks:
                    got += item.chunk.token_ids
                    if item.HasField("failure"):
                        failure = item.failure
            assert got == expected(prompt, 4)              # up to the poisoned token, then the failure
            assert failure.request_fault and failure.error_type == "RequestFault" and "NaN" in failure.message
            assert [m async for m in decode_call] == []
            call.cancel()
            assert await idle(worker)
    asyncio.run(main())


def test_per_call_and_stream_delivery_give_the_same_chunks():
    async def main():
        async with decode_worker(num_blocks=128) as (worker, stub):
            prompt = [31, 32, 33, 34, 35, 36]
            landing = await reserve(stub, prompt, 9, "per-call")
            per_call = [c async for c in stub.Decode(decode_request(landing, prompt, logprobs=True))]
            stream_id, call, messages = await open_stream(stub)
            landing = await reserve(stub, prompt, 9, "stream")
            request = decode_request(landing, prompt, logprobs=True)
            request.stream_id = stream_id
            decode_call = stub.Decode(request)
            streamed = []
            while not (streamed and streamed[-1].finished):
                streamed += [c.chunk for c in (await anext(messages)).chunks]
            assert [m async for m in decode_call] == []
            assert tokens_of(streamed) == tokens_of(per_call) == expected(prompt, 9)
            assert [lp for c in streamed for lp in c.logprobs] == [lp for c in per_call for lp in c.logprobs]
            assert streamed[0].prefill_seconds > 0 and per_call[0].prefill_seconds > 0
            assert streamed[-1].finish_reason == per_call[-1].finish_reason
            call.cancel()
            assert await idle(worker)
    asyncio.run(main())
