"""The decode service's KV blocks as a managed resource (issue 21), on real services and a fake model.

The fake model (``engine.runtime.fake``) writes each token's id into its KV slots and reads
the context back from the cache when it decodes, so a block shared from the prefix cache, a
push that skipped the wrong tokens or a recompute after preemption that wrote the wrong KV
changes the tokens: each test's outputs are checked against the pure-Python expectation.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.fake_stack import FakeStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BLOCK = 4


def _all_free(blocks: dict) -> bool:
    return all(free == total for free, total in blocks.values())


def test_sequences_that_outgrow_the_cache_together_are_preempted_and_lose_no_token(redis_url):
    """Three requests that each end with 7 blocks share a decode cache of 12: all are admitted
    (each reserves its prompt), the latest arrivals are preempted and resumed by recompute,
    and every stream is exactly what it is alone."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, decode_blocks=13) as stack:
            prompts = [[i * 7 + j for j in range(1, 7)] for i in range(1, 4)]
            outs = await asyncio.gather(*(stack.generate(p, 20, request_id=f"grow-{i}")
                                          for i, p in enumerate(prompts)))
            for prompt, out in zip(prompts, outs):
                assert out.error is None and out.token_ids == stack.expected(prompt, 20)
            decode = stack.decodes[0]
            assert decode.servicer.scheduler.preemptions >= 1
            assert _all_free(await stack.settle())
            decode.host.blocks.check()

    asyncio.run(main())


def test_a_repeated_prompt_lands_only_what_the_decode_cache_lacks(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            prompt = [(5 * i) % 400 + 3 for i in range(30)]             # 7 full blocks + 2 tokens
            first = await stack.generate(prompt, 4, request_id="cold")
            second = await stack.generate(prompt, 4, request_id="warm")
            for out in (first, second):
                assert out.error is None and out.token_ids == stack.expected(prompt, 4)
            assert first.record["decode_cached_tokens"] == "0"
            assert second.record["decode_cached_tokens"] == str(30 // BLOCK * BLOCK)
            per_token = int(first.record["kv_transfer_bytes"]) // 30                # + a 16-byte trailer
            assert int(second.record["kv_transfer_bytes"]) == (30 - 28) * per_token + 16
            assert int(second.record["cached_tokens"]) == 28                       # the prefill side too
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_a_conversations_next_turn_finds_its_history_on_the_decode_instance(redis_url):
    """Turn 2 = turn 1's prompt + its output + new tokens: the decode instance kept turn 1's
    prompt and output (minus the last sampled token, whose KV was never computed)."""
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1) as stack:
            turn1 = list(range(10, 23))                                  # 13 tokens
            out1 = await stack.generate(turn1, 8, request_id="turn-1")
            turn2 = turn1 + out1.token_ids + [77, 78, 79]
            out2 = await stack.generate(turn2, 5, request_id="turn-2")
            assert out2.error is None and out2.token_ids == stack.expected(turn2, 5)
            computed = len(turn1) + len(out1.token_ids) - 1              # KV the decode instance held
            assert int(out2.record["decode_cached_tokens"]) == computed // BLOCK * BLOCK
            # the prefill instance computed turn 1's prompt only
            assert int(out2.record["cached_tokens"]) == len(turn1) // BLOCK * BLOCK
            assert _all_free(await stack.settle())

    asyncio.run(main())


def test_without_the_prefix_cache_nothing_is_reused(redis_url):
    async def main():
        async with FakeStack(redis_url, prefill=1, decode=1, worker={"prefix_cache": False}) as stack:
            prompt = list(range(40, 70))
            for rid in ("a", "b"):
                out = await stack.generate(prompt, 3, request_id=rid)
                assert out.error is None and out.token_ids == stack.expected(prompt, 3)
                assert out.record["cached_tokens"] == out.record["decode_cached_tokens"] == "0"
            assert all(w.host.blocks.cached_blocks == 0 for w in stack.prefills + stack.decodes)

    asyncio.run(main())
