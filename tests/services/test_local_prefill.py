"""Local prefill on a decode instance (issue 22, conditional disaggregation), through its gRPC API.

A real ``DecodeService`` on a real gRPC server over the fake model (``tests.fake_stack``'s
``ScriptedExecutor``: ``engine.runtime.fake.FakeExecutor`` plus a stall), no Redis:
``Reserve(local_prefill=True)`` then ``Decode(local_prefill=True)`` as the router sends them.
The fake model writes each token's id into its KV slots and reads the context back from the
cache, so a chunk boundary in the wrong place, a prefix block shared wrongly or a skipped token
changes the output: every stream is compared with ``FakeExecutor.expected``.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
import pytest

from cleave.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from common.flags import replace
from engine.runtime.fake import FakeExecutor, tiny_config
from services import decode
from services.config import WorkerConfig
from services.worker import WorkerHost, start_worker
from tests.fake_stack import ScriptedExecutor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BLOCK = 4
MODEL = tiny_config(vocab=512)


def expected(prompt: list[int], n: int) -> list[int]:
    return FakeExecutor.expected(prompt, n, MODEL.vocab_size)


@contextlib.asynccontextmanager
async def decode_worker(num_blocks: int = 64, chunk: int = 8, **kw):
    """A decode worker (no registry) and a stub of its Decode service."""
    cfg = replace(WorkerConfig(pool="decode"), worker_id="decode-local", num_blocks=num_blocks, block_size=BLOCK,
                  transport="tcp", prefill_chunk_tokens=chunk, **kw)
    make = functools.partial(ScriptedExecutor, model_config=MODEL)
    worker = await start_worker(WorkerHost(cfg, make=make), decode.DecodeService, decode.add_to_server)
    channel = grpc.aio.insecure_channel(worker.host.address)
    try:
        yield worker, worker_pb2_grpc.DecodeStub(channel)
    finally:
        await channel.close()
        await worker.stop(grace=None)


async def reserve(stub, prompt: list[int], max_tokens: int, request_id: str = "r", local: bool = True):
    return await stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, num_prompt_tokens=len(prompt), max_tokens=max_tokens,
        deadline_unix=time.time() + 30, prompt_token_ids=prompt, local_prefill=local))


def decode_request(landing, prompt: list[int], local: bool = True, first_index: int = 0, **sampling):
    sampling.setdefault("ignore_eos", True)
    return worker_pb2.DecodeRequest(transfer_id=landing.transfer_id, prompt_token_ids=prompt,
                                    sampling=inference_pb2.SamplingParams(**sampling), seed=7,
                                    first_token_index=first_index, local_prefill=local)


async def generate(stub, prompt: list[int], max_tokens: int, request_id: str = "r", **sampling):
    """Reserve + Decode, locally prefilled: (landing descriptor, every DecodeChunk)."""
    landing = await reserve(stub, prompt, max_tokens, request_id)
    chunks = [c async for c in stub.Decode(decode_request(landing, prompt, **sampling))]
    return landing, chunks


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def idle(worker, timeout: float = 5.0) -> bool:
    """Every reservation gone and every block back (free or cached), within ``timeout``."""
    deadline = time.monotonic() + timeout
    blocks = worker.host.blocks
    while time.monotonic() < deadline:
        if worker.servicer.busy() == 0 and blocks.available_blocks == blocks.total and not blocks.owners():
            blocks.check()
            return True
        await asyncio.sleep(0.01)
    return False


def counter(worker, name: str) -> float:
    return worker.host.metrics.registry.get_sample_value(name + "_total", worker.host.metrics.labels()) or 0.0


def test_a_locally_prefilled_request_streams_the_expected_tokens():
    async def main():
        async with decode_worker(chunk=8) as (worker, stub):
            prompt = [(5 * i) % 400 + 3 for i in range(30)]
            landing = await reserve(stub, prompt, 8)
            assert landing.num_cached_tokens == 0 and landing.block_size == BLOCK and landing.transfer_id
            info = worker.servicer._info()
            assert (info.waiting, info.queued_tokens) == (1, 30)       # the prompt this instance will compute
            chunks = [c async for c in stub.Decode(decode_request(landing, prompt))]
            assert tokens_of(chunks) == expected(prompt, 8)
            first = chunks[0]
            assert first.token_ids[0] == expected(prompt, 1)[0]
            assert first.cached_tokens == 0 and first.prefill_seconds > 0
            assert all(c.prefill_seconds == 0 and c.cached_tokens == 0 for c in chunks[1:])
            assert chunks[-1].finished and chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert worker.servicer.scheduler.prefill_chunks == 4          # 8 + 8 + 8 + 6 tokens
            assert worker.host.executor.forwards == 4 + 7                 # 4 chunks, 7 decode steps
            assert (counter(worker, "cleave_local_prefills"), counter(worker, "cleave_local_prefill_tokens")) \
                == (1, 30)
            assert await idle(worker)
            assert worker.servicer._info().queued_tokens == 0

    asyncio.run(main())


def test_a_prompt_partly_in_the_decode_cache_computes_only_the_rest():
    """A next turn finds its history; a repeated prompt all of whose blocks are cached still
    computes its last block (the first token's logits come from the last position)."""
    async def main():
        async with decode_worker(chunk=8) as (worker, stub):
            turn1 = list(range(10, 23))                                     # 13 tokens
            _, chunks1 = await generate(stub, turn1, 6, "turn-1")
            out1 = tokens_of(chunks1)
            assert out1 == expected(turn1, 6) and chunks1[0].cached_tokens == 0
            turn2 = turn1 + out1 + [77, 78, 79]                             # 22 tokens
            landing, chunks2 = await generate(stub, turn2, 5, "turn-2")
            computed = len(turn1) + len(out1) - 1                           # 18: the last output was never fed
            assert landing.num_cached_tokens == chunks2[0].cached_tokens == computed // BLOCK * BLOCK == 16
            assert tokens_of(chunks2) == expected(turn2, 5)
            again = list(range(100, 116))                                   # 16 tokens, 4 blocks
            _, cold = await generate(stub, again, 2, "cold")
            landing, warm = await generate(stub, again, 2, "warm")
            assert landing.num_cached_tokens == warm[0].cached_tokens == 12
            assert tokens_of(cold) == tokens_of(warm) == expected(again, 2)
            assert counter(worker, "cleave_local_prefill_tokens") == 13 + (22 - 16) + 16 + 4
            assert await idle(worker)

    asyncio.run(main())


def test_logprobs_continuations_and_the_first_token_finishing():
    async def main():
        async with decode_worker() as (worker, stub):
            prompt = list(range(1, 11))
            _, chunks = await generate(stub, prompt, 3, "lp", logprobs=True, top_logprobs=2)
            want = expected(prompt, 3)
            assert tokens_of(chunks) == want
            entries = [e for c in chunks for e in c.logprobs]
            assert [e.token_id for e in entries] == want and all(len(e.top) == 2 for e in entries)
            assert entries[0].top[0].token_id == want[0]
            # a continuation (outputs 0-1 made before): the prompt carries them, output 2 is sampled here
            landing = await reserve(stub, prompt + want[:2], 1, "cont")
            cont = [c async for c in stub.Decode(decode_request(landing, prompt + want[:2], first_index=2))]
            assert len(cont) == 1 and list(cont[0].token_ids) == want[2:3] and cont[0].finished
            assert cont[0].finish_reason == inference_pb2.FINISH_REASON_LENGTH and cont[0].prefill_seconds > 0
            assert cont[0].cached_tokens == 8                               # turn "lp" left 12 computed
            # EOS on the first token
            eos = expected([9, 9, 9], 1)[0]
            landing = await reserve(stub, [9, 9, 9], 5, "eos")
            req = decode_request(landing, [9, 9, 9], ignore_eos=False)
            req.eos_token_ids.append(eos)
            stop = [c async for c in stub.Decode(req)]
            assert tokens_of(stop) == [eos] and stop[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
            assert await idle(worker)

    asyncio.run(main())


def test_local_prefills_interleave_with_running_streams_and_each_other():
    async def main():
        async with decode_worker(num_blocks=160, chunk=4) as (worker, stub):
            prompts = [[(i * 37 + j) % 500 + 1 for j in range(5 + 9 * i)] for i in range(6)]
            outs = await asyncio.gather(*(generate(stub, p, 6 + i, f"c{i}") for i, p in enumerate(prompts)))
            for i, (prompt, (_, chunks)) in enumerate(zip(prompts, outs)):
                assert tokens_of(chunks) == expected(prompt, 6 + i)
            assert counter(worker, "cleave_local_prefills") == 6
            assert await idle(worker)

    asyncio.run(main())


def test_cancel_or_abort_mid_prefill_releases_everything():
    async def main():
        async with decode_worker(chunk=4) as (worker, stub):
            executor, sched = worker.host.executor, worker.servicer.scheduler
            executor.stall = 0.02                                           # every pass: 20 ms
            prompt = [(3 * i) % 500 + 1 for i in range(200)]                # 50 chunks
            for how in ("cancel", "abort"):
                landing = await reserve(stub, prompt, 4, how)
                call = stub.Decode(decode_request(landing, prompt))
                reader = asyncio.ensure_future(call.read())
                while sched.prefill_chunks < 3:
                    await asyncio.sleep(0.005)
                assert sched.num_prefilling == 1 and worker.servicer.busy() == 1
                if how == "cancel":
                    call.cancel()
                else:
                    assert (await stub.Abort(worker_pb2.AbortRequest(transfer_id=landing.transfer_id))).found
                with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
                    await reader
                assert await idle(worker)
                assert sched.num_prefilling == 0 and sched.prefill_chunks < 50
                assert worker.host.blocks.match(prompt) >= 8                # the chunks it computed stay cached
                sched.prefill_chunks = 0
                worker.host.blocks.reset_cache()
            executor.stall = 0.0
            # a reservation never decoded is released by Abort (no receive was posted)
            landing = await reserve(stub, prompt[:9], 3, "never")
            assert (await stub.Abort(worker_pb2.AbortRequest(request_id="never"))).found
            assert await idle(worker)
            assert counter(worker, "cleave_local_prefills") == 0

    asyncio.run(main())


def test_a_failing_prefill_fails_its_request_only():
    async def main():
        async with decode_worker() as (worker, stub):
            executor = worker.host.executor
            running = stub.Decode(decode_request(await reserve(stub, [5] * 6, 40, "running"), [5] * 6))
            first = await running.read()                                    # running before the others come
            executor.stall = 0.01
            executor.poison = 300                 # a prompt ending in 300 gets NaN logits: its own fault
            landing = await reserve(stub, [1, 2, 300], 4, "nan")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.Decode(decode_request(landing, [1, 2, 300]))]
            assert err.value.code() == grpc.StatusCode.INTERNAL and "NaN" in err.value.details()   # RequestFault
            executor.poison = None
            rest = []
            while (chunk := await running.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            assert tokens_of([first, *rest]) == expected([5] * 6, 40)
            # every pass raising (a dead rank): the prefilling request ends UNAVAILABLE, nothing leaks
            executor.stall = 0.0
            executor.fault = RuntimeError("rank 1 of the instance exited")
            landing = await reserve(stub, list(range(20)), 4, "dead")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.Decode(decode_request(landing, list(range(20))))]
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "exited" in err.value.details()
            executor.fault = None
            _, chunks = await generate(stub, list(range(20)), 3, "after")
            assert tokens_of(chunks) == expected(list(range(20)), 3)
            assert await idle(worker)

    asyncio.run(main())


def test_what_a_local_prefill_refuses():
    async def main():
        async with decode_worker() as (worker, stub):
            bad = worker_pb2.ReserveRequest(request_id="x", num_prompt_tokens=4, max_tokens=2, local_prefill=True)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Reserve(bad)                                     # no prompt to compute
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in err.value.details()
            prompt = [1, 2, 3, 4, 5]
            for local_reserve, local_decode, extra, what in (
                    (True, True, {"prompt_logprobs": True}, "prompt logprobs"),
                    (True, False, {}, "must set local_prefill"),
                    (False, True, {}, "cannot set local_prefill")):
                landing = await reserve(stub, prompt, 3, "x", local=local_reserve)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [c async for c in stub.Decode(decode_request(landing, prompt, local=local_decode, **extra))]
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in err.value.details()
                assert await idle(worker)                                   # the reservation is gone
            # a reservation is decoded once
            landing = await reserve(stub, prompt, 2, "once")
            assert tokens_of([c async for c in stub.Decode(decode_request(landing, prompt))]) == expected(prompt, 2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in stub.Decode(decode_request(landing, prompt))]
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert await idle(worker)

    asyncio.run(main())


def test_reserve_keeps_the_watermark_and_the_whole_prompt_fits():
    """A local reservation takes the prompt's blocks + 1 slot like a pushed one, so the room
    rules are the same: a prompt that does not fit is refused at Reserve, before any work."""
    async def main():
        async with decode_worker(num_blocks=9) as (worker, stub):           # 8 blocks = 32 slots
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await reserve(stub, list(range(40)), 2, "big")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _, chunks = await generate(stub, list(range(27)), 4, "fits")     # 28 slots: 7 blocks
            assert tokens_of(chunks) == expected(list(range(27)), 4)
            assert await idle(worker)

    asyncio.run(main())


def test_reserve_and_abort_never_block_the_event_loop_on_the_step_in_progress():
    """Posting a pushed prompt's receives, and cancelling them, wait for the executor's channel,
    which a decode step holds: those waits run off the event loop, so the instance keeps serving
    (and relaying tokens) meanwhile. The channel is held here by the test, as a long step would."""
    import threading

    async def main():
        async with decode_worker() as (worker, stub):
            channel = worker.host.executor._lock
            channel.acquire()
            safety = threading.Timer(10.0, channel.release)     # a blocked loop fails, not hangs
            safety.start()
            try:
                reserving = asyncio.create_task(reserve(stub, [3, 4, 5, 6, 7], 4, "pushed", local=False))
                deadline = time.monotonic() + 5
                while not worker.servicer._reservations and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert worker.servicer._reservations               # Reserve is posting its receives
                await asyncio.wait_for(stub.Info(worker_pb2.InfoRequest()), 5)   # served meanwhile
                assert not reserving.done()
            finally:
                if safety.is_alive():
                    safety.cancel()
                    channel.release()
            landing = await reserving
            assert landing.transfer_id
            channel.acquire()                   # the same for an Abort of a reservation not decoding
            safety = threading.Timer(10.0, channel.release)
            safety.start()
            try:
                aborting = asyncio.ensure_future(stub.Abort(worker_pb2.AbortRequest(transfer_id=landing.transfer_id)))
                deadline = time.monotonic() + 5
                while worker.servicer._reservations and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert not worker.servicer._reservations         # forgotten at once
                await asyncio.wait_for(stub.Info(worker_pb2.InfoRequest()), 5)
                assert not aborting.done()                       # its receives wait for the channel
            finally:
                if safety.is_alive():
                    safety.cancel()
                    channel.release()
            assert (await aborting).found
            assert await idle(worker)
    asyncio.run(main())
