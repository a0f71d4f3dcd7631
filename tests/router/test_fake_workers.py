"""The router's failure rules (DESIGN §4, §6) on real workers without a model (tests/fake_stack.py).

Real prefill/decode services, gRPC servers, Redis registry, TCP KV handoff and ``RouterCore``;
only the model is ``engine.runtime.fake.FakeExecutor``, whose tokens ``FakeStack.expected``
knows exactly. Covered: a worker fault is retried elsewhere (prefill) or continued elsewhere
mid-stream (decode) with nothing lost or repeated, up to ``max_attempts``; a channel closed
under a call is the worker's failure, not the client's cancel; a request's own fault is not
retried; admission refuses what never fits, queues what does not fit yet, and gives up after
``admission_wait_s``; a burst spreads over equal decode workers; KV corrupted on the wire is
caught by the checksum. Every test also checks the request's Redis record and
that every KV block is free again afterwards.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time

import grpc
import pytest

from cleave.v1 import inference_pb2 as pb
from cleave.v1 import worker_pb2
from engine.runtime.executor import InstanceError
from tests.fake_stack import FakeStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _all_free(free: dict[str, tuple[int, int]]) -> bool:
    return all(f == total for f, total in free.values())


async def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return condition()


# ---- worker faults: retried on other workers -----------------------------------------------

def test_a_faulty_prefill_worker_is_retried_on_the_other(redis_url):
    async def main():
        async with FakeStack(redis_url) as stack:
            stack.executor("prefill", 0).fault = InstanceError("rank 0 of the instance exited")
            out = await stack.generate([3, 1, 4, 1, 5], 12, request_id="pf-retry")
            assert out.error is None and out.token_ids == stack.expected([3, 1, 4, 1, 5], 12)
            assert out.finish_reason == pb.FINISH_REASON_LENGTH
            r = out.record
            assert (r["state"], r["attempts"], r["prefill_worker"]) == ("finished", "2", "prefill-1")
            assert stack.executor("prefill", 1).forwards == 1
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_every_prefill_worker_faulty_fails_unavailable_after_max_attempts(redis_url):
    async def main():
        async with FakeStack(redis_url, max_attempts=3) as stack:
            for i in (0, 1):
                stack.executor("prefill", i).fault = InstanceError(f"prefill instance {i} is down")
            outs = await asyncio.gather(*(stack.generate([7, 7, i], 6, request_id=f"dead-{i}") for i in range(3)))
            for out in outs:
                assert out.token_ids == [] and out.error is not None
                assert out.error.code == grpc.StatusCode.UNAVAILABLE
                assert "failed after 3 attempts" in str(out.error) and "prefill instance" in str(out.error)
                assert (out.record["state"], out.record["attempts"]) == ("failed", "3")
            assert all(e.forwards == 0 for e in stack.executors())
            assert _all_free(await stack.settle())     # every decode reservation was aborted
            assert not stack.core.active and stack.core.queued == 0

    asyncio.run(main())


def test_a_decode_worker_failing_mid_stream_continues_on_the_other(redis_url):
    """decode-0 streams 5 tokens, then (once the client holds all 6) every forward fails: the
    router re-prefills prompt + those 6 tokens and decode-1 continues the same stream."""
    async def main():
        async with FakeStack(redis_url) as stack:
            prompt, n, gate = [11, 12, 13], 24, threading.Event()
            stack.executor("decode", 0).fail_after(5, InstanceError("rank 1 of the instance exited"), gate)
            out = await stack.generate(prompt, n, request_id="failover",
                                       on_tokens=lambda ids: len(ids) >= 6 and gate.set())
            assert out.error is None
            assert out.token_ids == stack.expected(prompt, n)       # no gap, no duplicate
            assert stack.executor("decode", 0).forwards == 5
            assert stack.executor("decode", 1).forwards == n - 6 - 1   # the re-prefill gave token 7
            assert stack.executor("prefill", 0).forwards + stack.executor("prefill", 1).forwards == 2
            r = out.record
            assert (r["state"], r["attempts"], r["decode_worker"], r["completion_tokens"]) == \
                ("finished", "2", "decode-1", str(n))
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_a_channel_closed_under_a_call_is_a_worker_failure_not_a_cancel(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=2, max_attempts=3) as stack:
            for e in stack.executors():
                e.stall = 0.02
            prompt, n = [3, 3, 9], 30
            reached = asyncio.Event()
            task = asyncio.create_task(stack.generate(prompt, n, request_id="closed",
                                                      on_tokens=lambda ids: len(ids) >= 8 and reached.set()))
            await asyncio.wait_for(reached.wait(), 30)
            handle = next(h for h in stack.core.directory.pool("decode") if h.inflight)
            await handle.channel.close()
            out = await task
            assert out.error is None and out.token_ids == stack.expected(prompt, n)
            assert (out.record["state"], out.record["attempts"]) == ("finished", "2")
            assert out.record["error"] == ""

    asyncio.run(main())


def test_a_token_stream_ending_mid_request_continues_on_the_other_decode_worker(redis_url):
    """The router reads every sequence of a decode worker on one Tokens stream; that stream
    ending under the requests running there fails them over to the other worker, exactly."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=2, max_attempts=3) as stack:
            for e in stack.executors():
                e.stall = 0.02
            prompts, n = [[5, 6, 7 + i] for i in range(3)], 30
            reached = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(stack.generate(p, n, request_id=f"streamed-{i}",
                                                        on_tokens=lambda ids, i=i: len(ids) >= 6 and reached[i].set()))
                     for i, p in enumerate(prompts)]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in reached)), 30)
            busy = [w for w in stack.decodes if w.servicer.scheduler.num_running]
            assert len(stack.core.token_streams._streams) == len(busy)   # one stream per decode worker
            moved = busy[0].servicer.scheduler.num_running
            busy[0].servicer.streams.close()     # ends its stream; new ones are refused there
            outs = await asyncio.gather(*tasks)
            assert sum(int(out.record["attempts"]) == 2 for out in outs) == moved
            for p, out in zip(prompts, outs):
                assert out.error is None and out.token_ids == stack.expected(p, n)
                assert out.record["state"] == "finished" and out.record["decode_worker"] != busy[0].host.worker_id
            assert _all_free(await stack.settle())

    asyncio.run(main())


# ---- a request's own fault: not retried ------------------------------------------------------

POISON = 100   # rows whose last input token is this get NaN logits, on every worker


def test_a_request_fault_in_prefill_is_not_retried(redis_url):
    async def main():
        async with FakeStack(redis_url) as stack:
            for e in stack.executors():
                e.poison = POISON
            out = await stack.generate([5, 6, POISON], 4, request_id="nan-prefill")
            assert out.token_ids == [] and out.error.code == grpc.StatusCode.INTERNAL
            assert "NaN" in str(out.error)
            assert (out.record["state"], out.record["attempts"]) == ("failed", "1")
            assert sum(e.forwards for e in stack.executors()) == 1   # one prefill, nothing retried
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_a_request_fault_in_decode_ends_that_request_alone(redis_url):
    """The poisoned request's first token is POISON, so its first decode row is NaN; its
    batch-mate on the same decode worker finishes untouched, and nothing is retried."""
    async def main():
        async with FakeStack(redis_url, decode=1) as stack:
            bad, good, n = [40, 59], [1, 2, 3], 30
            assert stack.expected(bad, 1) == [POISON] and POISON not in good + stack.expected(good, n)
            for e in stack.executors():
                e.poison = POISON
            out_bad, out_good = await asyncio.gather(stack.generate(bad, n, request_id="nan-decode"),
                                                     stack.generate(good, n, request_id="mate"))
            assert out_bad.token_ids == [POISON] and out_bad.error.code == grpc.StatusCode.INTERNAL
            assert (out_bad.record["state"], out_bad.record["attempts"]) == ("failed", "1")
            assert out_good.error is None and out_good.token_ids == stack.expected(good, n)
            assert out_good.record["attempts"] == "1"
            assert sum(stack.executor("prefill", i).forwards for i in (0, 1)) == 2   # no re-prefill
            assert _all_free(await stack.settle())

    asyncio.run(main())


# ---- admission ----------------------------------------------------------------------------------

def test_a_request_larger_than_any_decode_cache_is_refused_at_once(redis_url):
    """A prompt that, with the one token of headroom, no decode cache can hold is refused at
    once; ``max_tokens`` beyond the cache is only a bound: the tokens that fit are made, and a
    sequence that outgrows every cache ends RESOURCE_EXHAUSTED with what it made streamed."""
    async def main():
        async with FakeStack(redis_url, decode_blocks=8, admission_wait_s=5.0) as stack:   # 7 blocks = 28 tokens
            t0 = time.monotonic()
            out = await stack.generate(list(range(1, 29)), 2, request_id="too-big")
            assert out.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the prompt (28 tokens, + 1 to decode into) is more KV than any decode instance holds" \
                in str(out.error)
            assert time.monotonic() - t0 < 2.5                           # refused, not queued
            assert out.record["state"] == "failed"
            assert all(e.forwards == 0 for e in stack.executors())
            fits = await stack.generate([1, 2, 3, 4], 24, request_id="just-fits")   # 28 tokens
            assert fits.error is None and fits.token_ids == stack.expected([1, 2, 3, 4], 24)
            grows = await stack.generate([1, 2, 3, 4], 40, request_id="outgrows")
            assert grows.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert grows.token_ids == stack.expected([1, 2, 3, 4], 25)   # KV for 28 tokens, + the last sampled
            assert grows.record["state"] == "failed"
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_requests_beyond_the_kv_room_wait_then_complete(redis_url):
    """One decode worker with room for one request at a time: a burst of three queues in the
    router and every request completes, in turn, with its exact tokens. (Each prompt alone, plus
    the token of headroom the decode instance reserves, takes 6 of its 8 blocks.)"""
    async def main():
        async with FakeStack(redis_url, decode=1, decode_blocks=9) as stack:   # 20 + 1 tokens = 6 of 8 blocks
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, stack.core.queued)
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            prompts = [list(range(i, i + 20)) for i in (100, 200, 300)]
            outs = await asyncio.gather(*(stack.generate(p, 4, request_id=f"q{k}") for k, p in enumerate(prompts)))
            watcher.cancel()
            for p, out in zip(prompts, outs):
                assert out.error is None and out.token_ids == stack.expected(p, 4)
                assert (out.record["state"], out.record["attempts"]) == ("finished", "1")
            assert peak >= 1 and stack.core.queued == 0
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_admission_gives_up_after_its_wait_or_proceeds_when_room_frees(redis_url):
    async def main():
        async with FakeStack(redis_url, decode=1, decode_blocks=9, admission_wait_s=0.5) as stack:
            worker = stack.core.directory.pool("decode")[0]
            hold = await worker.stub.Reserve(worker_pb2.ReserveRequest(      # a 24-token prompt: 7 of the 8 blocks
                request_id="hold", num_prompt_tokens=24, max_tokens=4, deadline_unix=time.time() + 30))
            t0 = time.monotonic()
            out = await stack.generate([1, 2, 3, 4], 12, request_id="gave-up")
            waited = time.monotonic() - t0
            assert out.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no decode instance had KV room for the prompt's 4 tokens (+ 1 to decode into)" in str(out.error)
            assert 0.5 <= waited < 3.0 and out.record["state"] == "failed"

            later = asyncio.create_task(stack.generate([1, 2, 3, 4], 12, request_id="waited"))
            assert await _until(lambda: stack.core.queued == 1) and not later.done()
            await worker.stub.Abort(worker_pb2.AbortRequest(transfer_id=hold.transfer_id))
            out = await later
            assert out.error is None and out.token_ids == stack.expected([1, 2, 3, 4], 12)
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_a_burst_spreads_over_equal_decode_workers(redis_url):
    """Requests count against a worker while in flight, so a burst does not all land on the
    worker that looked idlest (load records stay still: heartbeats are slower than the test)."""
    async def main():
        async with FakeStack(redis_url, heartbeat_s=5.0) as stack:
            prompts = [[i, 2 * i, 3] for i in range(1, 5)]
            outs = await asyncio.gather(*(stack.generate(p, 8, request_id=f"b{k}") for k, p in enumerate(prompts)))
            for p, out in zip(prompts, outs):
                assert out.error is None and out.token_ids == stack.expected(p, 8)
            placed = collections.Counter(out.record["decode_worker"] for out in outs)
            assert placed == {"decode-0": 2, "decode-1": 2}
            assert _all_free(await stack.settle())                   # in-flight counts back to 0

    asyncio.run(main())


# ---- KV corrupted on the wire ----------------------------------------------------------------

def test_corrupted_kv_is_caught_by_the_checksum_and_retried(redis_url):
    async def main():
        async with FakeStack(redis_url) as stack:
            transport = stack.executor("prefill", 0).transport
            transport.corrupt = 1
            out = await stack.generate([2, 7, 1, 8], 10, request_id="bitflip")
            assert transport.corrupted == 1
            assert out.error is None and out.token_ids == stack.expected([2, 7, 1, 8], 10)
            assert (out.record["attempts"], out.record["decode_worker"]) == ("2", "decode-1")
            assert stack.executor("decode", 0).forwards == 0        # the bad KV never decoded
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_without_checksums_corrupted_kv_changes_the_tokens(redis_url):
    """The control of the test above: the fake model really reads the landed KV."""
    async def main():
        async with FakeStack(redis_url, checksum=False) as stack:
            stack.executor("prefill", 0).transport.corrupt = 1
            prompt, expected = [2, 7, 1, 8], stack.expected([2, 7, 1, 8], 10)
            out = await stack.generate(prompt, 10, request_id="silent")
            assert out.error is None and out.record["attempts"] == "1"
            assert out.token_ids[0] == expected[0]                   # sampled by prefill, before the push
            assert out.token_ids[1] != expected[1]

    asyncio.run(main())


# ---- deadlines: only the client's or the operator's ------------------------------------------------

def test_without_any_deadline_a_request_runs_to_its_end(redis_url):
    """No operator deadline (the default) and none from the client: the request is not bounded
    by the server (its worker calls carry no timeout) and finishes; a client deadline still ends it."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, request_timeout_s=0.0) as stack:
            seen = []
            real = stack.decodes[0].servicer._reserve
            stack.decodes[0].servicer._reserve = lambda req, caller="": seen.append(req.deadline_unix) or real(req, caller)
            out = await stack.generate([4, 4, 2], 12)
            assert out.error is None and out.token_ids == stack.expected([4, 4, 2], 12)
            assert seen == [0.0]                              # "no deadline" on the wire
            gate = threading.Event()
            stack.executor("decode", 0).fail_after(2, RuntimeError("stalled"), gate)  # never opened: stalls
            late = await stack.generate([4, 4, 2], 12, timeout_s=0.5)
            gate.set()
            assert isinstance(late.error, Exception) and "deadline" in str(late.error)
            assert late.record["state"] == "failed"
            assert _all_free(await stack.settle(10.0))

    asyncio.run(main())
