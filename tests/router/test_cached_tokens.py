"""Prefix-cached prompt tokens through the router (issue 21), on real workers without a model.

The prefill instance reports the prompt tokens its prefix cache served with the first token
(``PrefillEvent.cached_tokens``); the router carries that count of the attempt that produced
the request's first token to the last ``GenerateResponse.usage.cached_tokens`` and to the
``cached_tokens`` field of the request's Redis hash (0 when nothing was cached). The decode
reservation carries the prompt itself (``ReserveRequest.prompt_token_ids``) so the decode
instance can reuse its own cached prefix blocks.

The plumbing tests wrap the real ``PrefillService.Prefill`` to report a count the test chooses,
so they do not depend on what the prefill instance's cache holds; the last test repeats one
long prompt end to end and expects the prefill instance's own cache to report it.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from cleave.v1 import worker_pb2
from engine.runtime.executor import InstanceError
from services import decode, prefill
from tests.fake_stack import FakeStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def reported(monkeypatch):
    """``reported["fn"](worker_id, request) -> int`` sets the ``cached_tokens`` every prefill
    worker reports with its token event (None: leave what the service reported)."""
    box = {"fn": None}
    real = prefill.PrefillService.Prefill

    async def Prefill(self, request, context):
        async for event in real(self, request, context):
            if event.WhichOneof("event") == "token_id" and box["fn"] is not None:
                event.cached_tokens = box["fn"](self.host.worker_id, request)
            yield event

    monkeypatch.setattr(prefill.PrefillService, "Prefill", Prefill)
    return box


@pytest.fixture
def reserves(monkeypatch):
    """Every ``ReserveRequest`` the decode workers receive, in order."""
    seen: list[worker_pb2.ReserveRequest] = []
    real = decode.DecodeService.Reserve

    async def Reserve(self, request, context):
        seen.append(request)
        return await real(self, request, context)

    monkeypatch.setattr(decode.DecodeService, "Reserve", Reserve)
    return seen


def test_reported_cached_tokens_reach_usage_and_the_redis_hash(redis_url, reported, reserves):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            prompt = list(range(40, 60))
            reported["fn"] = lambda worker, request: 16
            out = await stack.generate(prompt, 6, request_id="cached")
            assert out.error is None and out.token_ids == stack.expected(prompt, 6)
            last = out.messages[-1].usage
            assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (20, 6, 16)
            assert all(not m.HasField("usage") for m in out.messages[:-1])
            assert (out.record["state"], out.record["cached_tokens"]) == ("finished", "16")
            # the decode reservation carries the prompt, for the decode instance's own prefix reuse
            assert [(r.request_id, list(r.prompt_token_ids), r.num_prompt_tokens) for r in reserves] == \
                [("cached", prompt, 20)]

            reported["fn"] = lambda worker, request: 0
            cold = await stack.generate(prompt, 3, request_id="cold")
            assert cold.messages[-1].usage.cached_tokens == 0
            assert cold.record["cached_tokens"] == "0"                 # always present

    asyncio.run(main())


def test_a_prompt_scored_alone_reports_its_cached_tokens(redis_url, reported):
    """``max_tokens`` 0 with prompt logprobs: a prefill without decode still reports them."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            reported["fn"] = lambda worker, request: 8
            out = await stack.generate(list(range(1, 13)), 0, request_id="scored", prompt_logprobs=True)
            assert out.error is None and out.token_ids == []
            assert (out.messages[-1].usage.prompt_tokens, out.messages[-1].usage.cached_tokens) == (12, 8)
            assert out.record["cached_tokens"] == "8"

    asyncio.run(main())


def _per_worker(worker: str, request) -> int:
    """A count each prefill worker reports for itself, and a retry's longer prompt another one."""
    return len(request.token_ids) - (1 if worker == "prefill-1" else 2)


def test_a_prefill_that_failed_before_the_first_token_does_not_count(redis_url, reported):
    async def main():
        async with FakeStack(redis_url) as stack:
            reported["fn"] = _per_worker
            stack.executor("prefill", 0).fault = InstanceError("rank 0 of the instance exited")
            prompt = [3, 1, 4, 1, 5, 9, 2, 6]
            out = await stack.generate(prompt, 6, request_id="pf-retry")
            assert out.error is None and out.token_ids == stack.expected(prompt, 6)
            assert (out.record["attempts"], out.record["prefill_worker"]) == ("2", "prefill-1")
            assert out.messages[-1].usage.cached_tokens == len(prompt) - 1 == int(out.record["cached_tokens"])

    asyncio.run(main())


def test_a_retry_after_streamed_tokens_keeps_the_first_count(redis_url, reported, reserves):
    """The retry prefills prompt + the tokens already streamed again; its own count is not the
    request's."""
    async def main():
        async with FakeStack(redis_url) as stack:
            reported["fn"] = _per_worker
            prompt, n, gate = [11, 12, 13, 14, 15], 16, threading.Event()
            stack.executor("decode", 0).fail_after(5, InstanceError("rank 1 of the instance exited"), gate)
            out = await stack.generate(prompt, n, request_id="failover",
                                       on_tokens=lambda ids: len(ids) >= 6 and gate.set())
            assert out.error is None and out.token_ids == stack.expected(prompt, n)
            assert (out.record["attempts"], out.record["decode_worker"]) == ("2", "decode-1")
            first = out.record["prefill_worker"]
            want = len(prompt) - (1 if first == "prefill-1" else 2)
            assert out.messages[-1].usage.cached_tokens == want == int(out.record["cached_tokens"])
            # the retry reserved for (and sent) the prompt plus the tokens already streamed
            retry = [r for r in reserves if r.request_id == "failover"][-1]
            assert list(retry.prompt_token_ids) == prompt + out.token_ids[:6]

    asyncio.run(main())


def test_a_repeated_long_prompt_is_served_from_the_prefill_prefix_cache(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:   # block_size 4
            prompt = [(7 * i) % 500 + 1 for i in range(64)]
            cold = await stack.generate(prompt, 4, request_id="cold")
            warm = await stack.generate(prompt, 4, request_id="warm")
            assert cold.error is None and warm.error is None
            assert warm.token_ids == cold.token_ids == stack.expected(prompt, 4)
            assert cold.messages[-1].usage.cached_tokens == 0 and cold.record["cached_tokens"] == "0"
            cached = warm.messages[-1].usage.cached_tokens
            assert 0 < cached < len(prompt) and cached % 4 == 0          # whole blocks, never the last token
            assert warm.record["cached_tokens"] == str(cached)

    asyncio.run(main())
