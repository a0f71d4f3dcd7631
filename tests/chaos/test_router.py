"""No stream left hanging (issue: registry blips, an empty pool, a busy neighbour), on fake workers.

The chaos cases of ``tests/chaos/test_serve.py`` in miniature, fast enough for the default tier
(``tests/fake_stack.py``: real services, gRPC, Redis registry and TCP handoff, no model):

* a worker's registry record deleted for 1.5 s mid-stream or mid-prefill: the stream goes on
  untouched (a record's absence only stops new requests going there);
* the only decode instance killed (its record outliving it) and restarted: the stream waits for
  it and continues token-exact, calling the dead address a handful of times, not hundreds;
* one caller's reservation flood leaves the router its own budget.

Each checks the tokens, the Redis record and that every KV block is free again. The retry and
failover rules themselves (a worker fault retried or continued elsewhere, a channel closed under
a call counted as the worker's failure) are in ``tests/router/test_fake_workers.py``.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from cleave.v1 import worker_pb2, worker_pb2_grpc
from common.grpc_util import internal_channel
from tests.fake_stack import FakeStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _all_free(free: dict[str, tuple[int, int]]) -> bool:
    return all(f == total for f, total in free.values())


@pytest.mark.parametrize("pool", ["decode", "prefill"])
def test_a_registry_blip_does_not_touch_streams_in_flight(redis_url, pool):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            prompt, n = [2, 7, 1, 8], 40
            for e in stack.executors():
                e.stall = 0.02 if pool == "decode" else 0.0
            stack.executor("prefill", 0).stall = 1.0 if pool == "prefill" else 0.0   # a long prefill
            reached = asyncio.Event()
            task = asyncio.create_task(stack.generate(prompt, n, request_id=f"blip-{pool}",
                                                      on_tokens=lambda ids: len(ids) >= 10 and reached.set()))
            if pool == "decode":
                await asyncio.wait_for(reached.wait(), 30)
            else:
                await asyncio.sleep(0.3)                   # the prompt is in its prefill
            await stack.vanish(pool, 0, 1.5)
            out = await task
            assert out.error is None and out.token_ids == stack.expected(prompt, n)
            assert (out.record["state"], out.record["attempts"]) == ("finished", "1")
            assert stack.executor("decode", 0).forwards + stack.executor("prefill", 0).forwards == n  # no re-run
            assert _all_free(await stack.settle())
            again = await stack.generate(prompt, 5)          # the worker routes again once it is back
            assert again.token_ids == stack.expected(prompt, 5)

    asyncio.run(main())


def test_the_only_decode_instance_dies_and_its_restart_finishes_the_stream(redis_url, caplog):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, max_attempts=3, pool_wait_s=30.0) as stack:
            calls = {"reserve": 0}
            for e in stack.executors():
                e.stall = 0.02
            prompt, n = [1, 4, 1, 4, 2], 40
            reached = asyncio.Event()
            task = asyncio.create_task(stack.generate(prompt, n, request_id="only-decode",
                                                      on_tokens=lambda ids: len(ids) >= 10 and reached.set()))
            await asyncio.wait_for(reached.wait(), 30)
            old = stack.decodes[0]
            real = stack.core.directory.failed_to_reach

            def counting(handle, what):
                calls["reserve"] += what == "reserve"
                return real(handle, what)
            stack.core.directory.failed_to_reach = counting
            await stack.kill("decode", 0)
            await asyncio.sleep(2.0)                          # its record lives on (5 s TTL)
            await stack.restart("decode", 0)
            out = await task
            assert out.error is None and out.token_ids == stack.expected(prompt, n)
            assert out.record["state"] == "finished" and out.record["attempts"] == "2"
            assert stack.decodes[0].host.incarnation != old.host.incarnation
            assert calls["reserve"] <= 6, f"{calls['reserve']} reserves sent to the dead worker"
            warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "unreachable" in r.getMessage()]
            assert len(warned) <= 2
            assert _all_free(await stack.settle())

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())


def test_a_reservation_flood_from_one_caller_leaves_the_router_its_budget(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, decode_blocks=64,
                             worker={"max_reservations_per_caller": 8}) as stack:
            addr = stack.decodes[0].host.address
            token = stack.decodes[0].host.cfg.internal_token
            async with internal_channel(addr, token) as channel:    # another caller on this host
                stub = worker_pb2_grpc.DecodeStub(channel)
                for i in range(8):
                    await stub.Reserve(worker_pb2.ReserveRequest(request_id=f"flood-{i}", num_prompt_tokens=1,
                                                                 max_tokens=1))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Reserve(worker_pb2.ReserveRequest(request_id="flood-9", num_prompt_tokens=1,
                                                                 max_tokens=1))
                assert "per-caller limit is 8" in refused.value.details()
                out = await stack.generate([5, 5, 5], 10, request_id="after-flood")
                assert out.error is None and out.token_ids == stack.expected([5, 5, 5], 10)
                for i in range(8):
                    await stub.Abort(worker_pb2.AbortRequest(request_id=f"flood-{i}"))
            assert _all_free(await stack.settle())

    asyncio.run(main())
