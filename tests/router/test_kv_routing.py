"""KV-aware routing end to end on real services and a fake model (issue 22).

Two prefill and two decode instances publish their prefix caches' events to Redis; the
router's index follows them, and the ``kv-aware`` policy sends each turn of a conversation to
the instances holding its history. With the events stopped the index turns ``approximate``
and keeps routing from its own history; requests succeed either way with exact tokens.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.fake_stack import FakeStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BLOCK = 4


async def _conversation(stack: FakeStack, name: str, turns: int = 4) -> list:
    """``turns`` turns, each the history (prompt + output) plus 6 new tokens; the outputs."""
    history, outs = [], []
    for t in range(turns):
        prompt = history + [(17 * t + 3 * i + len(name)) % 400 + 1 for i in range(6 + 10 * (t == 0))]
        out = await stack.generate(prompt, 5, request_id=f"{name}-{t}")
        assert out.error is None and out.token_ids == stack.expected(prompt, 5)
        outs.append((prompt, out))
        history = prompt + out.token_ids
        await asyncio.sleep(0.3)        # think time: the finished turn's KV events reach the index
    return outs


async def _mode(stack: FakeStack, pool: str, want: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while stack.core.kv_index.mode(pool) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return stack.core.kv_index.mode(pool)


def test_each_turn_lands_where_its_history_is(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=2, decode=2) as stack:
            assert await _mode(stack, "decode", "exact") == "exact"
            for name in ("alpha", "beta"):
                outs = await _conversation(stack, name)
                decodes = {out.record["decode_worker"] for _, out in outs}
                prefills = {out.record["prefill_worker"] for _, out in outs}
                assert len(decodes) == 1 and len(prefills) == 1, (decodes, prefills)
                for (prompt, out), (prev, prev_out) in zip(outs[1:], outs):
                    computed = len(prev) + len(prev_out.token_ids) - 1   # KV the decode instance kept
                    assert int(out.record["decode_cached_tokens"]) == computed // BLOCK * BLOCK
                    assert int(out.record["cached_tokens"]) == len(prev) // BLOCK * BLOCK
                    # the index predicted what was delivered
                    assert out.record["predicted_decode_cached_tokens"] == out.record["decode_cached_tokens"]
                    assert out.record["predicted_cached_tokens"] == out.record["cached_tokens"]
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_with_events_stopped_the_index_turns_approximate_and_requests_still_succeed(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=2, decode=2) as stack:
            assert await _mode(stack, "decode", "exact") == "exact"
            for worker in stack.prefills + stack.decodes:       # the publishers stop, the workers serve on
                worker._kv_task.cancel()
            assert await _mode(stack, "decode", "approximate") == "approximate"
            assert await _mode(stack, "prefill", "approximate") == "approximate"
            outs = await _conversation(stack, "gamma", turns=3)
            # predicted from the router's own routing history: still the same instances
            assert len({out.record["decode_worker"] for _, out in outs}) == 1
            assert all(int(out.record["decode_cached_tokens"]) > 0 for _, out in outs[1:])
            info = stack.core.model_info()
            assert {p.pool: p.kv_index_mode for p in info.pools} == {"prefill": "approximate",
                                                                     "decode": "approximate"}

    asyncio.run(main())


def _all_free(blocks: dict) -> bool:
    return all(free == total for free, total in blocks.values())


def test_short_uncached_prompts_prefill_on_their_decode_instance(redis_url):
    """Conditional disaggregation: at most ``local_prefill_max_tokens`` uncached tokens prefill
    on the decode instance (no handoff), longer ones through the pool; tokens are exact either
    way, and a next turn whose new part is short is local with its history cached."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, local_prefill_max_tokens=24) as stack:
            short = list(range(30, 50))
            out = await stack.generate(short, 6, request_id="short")
            assert out.error is None and out.token_ids == stack.expected(short, 6)
            assert (out.record["prefill_mode"], out.record["prefill_reason"]) == ("local", "short")
            assert out.record["prefill_worker"] == out.record["decode_worker"] == "decode-0"
            assert "kv_transfer_bytes" not in out.record
            long = list(range(100, 160))
            out = await stack.generate(long, 6, request_id="long")
            assert out.error is None and out.token_ids == stack.expected(long, 6)
            assert (out.record["prefill_mode"], out.record["prefill_worker"]) == ("pool", "prefill-0")
            await asyncio.sleep(0.3)                   # the events of the finished turn reach the index
            turn2 = long + out.token_ids + [7, 8, 9]
            out = await stack.generate(turn2, 6, request_id="turn-2")
            assert out.error is None and out.token_ids == stack.expected(turn2, 6)
            assert out.record["prefill_mode"] == "local"
            assert int(out.record["cached_tokens"]) == (len(long) + 6 - 1) // BLOCK * BLOCK
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_without_prefill_instances_every_request_prefills_on_decode(redis_url):
    """``--prefill-instances 0``: aggregated serving from the same binaries."""
    async def main():
        async with FakeStack(redis_url, prefill=0, decode=2) as stack:
            prompts = [list(range(i, i + 40)) for i in (1, 50, 99)]
            outs = await asyncio.gather(*(stack.generate(p, 8, request_id=f"agg-{i}") for i, p in enumerate(prompts)))
            for p, out in zip(prompts, outs):
                assert out.error is None and out.token_ids == stack.expected(p, 8)
                assert (out.record["prefill_mode"], out.record["prefill_reason"]) == ("local", "no prefill instance")
            assert _all_free(await stack.settle())

    asyncio.run(main())
