"""The KV cache as a shared, on-demand resource, end to end on the default model (issue 21).

Through the OpenAI SDK against the real stack (router, one prefill and one decode instance of
SmolLM2 over UCX, Redis): chats that send no ``max_tokens`` (the router then allows the rest of
the context) take only the KV they use, so many run at once; a conversation's next turn finds
its history in both instances' prefix caches, reports it as ``cached_tokens`` and moves only
the KV the decode instance lacks; greedy tokens are the same with and without cache hits.
"""
from __future__ import annotations

import concurrent.futures as cf

import pytest

from tests.conftest import hf_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# SmolLM2-135M fp32: 30 layers x (K + V) x 3 KV heads x 64 dims x 4 bytes per token
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
TRAILER_BYTES = 16          # one message of a one-rank -> one-rank push (kvtransfer.message)
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def smol(smollm2_stack):
    from tests.e2e.test_serving import _guard_blocks
    yield from _guard_blocks(smollm2_stack)


@pytest.fixture
def openai_client(smollm2_stack):
    import openai

    with openai.OpenAI(base_url=smollm2_stack.http_url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_32_concurrent_chats_without_max_tokens_are_all_served(smol, openai_client):
    """Each asks for the whole context (about 8k tokens, more than this 256 MiB cache holds at
    once for even one request reserved up front) but uses a few dozen: none is refused."""
    def chat(i: int):
        return openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Is {i} an even number? Answer yes or no."}],
            temperature=0)          # greedy answers of 3 to 12 tokens, then EOS

    with cf.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(chat, range(32)))
    assert len(replies) == 32
    for r in replies:
        assert r.choices[0].finish_reason == "stop" and 1 <= r.usage.completion_tokens <= 24
        assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_a_second_turn_reuses_the_first_turns_kv(smol, openai_client, smollm2_reference):
    """Turn 2 (turn 1's messages, its reply, a new question) is served with ``cached_tokens``
    > 0, the decode instance already holds the history's whole blocks, the KV pushed for turn 2
    is exactly its tokens past them, and its greedy tokens are ``transformers``' on the whole
    prompt."""
    system = ("You are a careful assistant who answers questions about geography in full sentences, "
              "giving the country and continent of every city you name.")
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Which city is the capital of France?"}]
    first = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                  temperature=0, extra_headers={"X-Request-Id": "kv-turn-1"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And which city is the capital of Italy?"}]
    second = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                   temperature=0, extra_headers={"X-Request-Id": "kv-turn-2"})
    usage1, usage2 = first.usage, second.usage
    block = 16
    assert usage2.prompt_tokens_details.cached_tokens >= usage1.prompt_tokens // block * block > 0
    assert usage2.prompt_tokens_details.cached_tokens % block == 0
    h = smol.redis.hgetall("cleave:req:kv-turn-2")
    assert int(h["cached_tokens"]) == usage2.prompt_tokens_details.cached_tokens
    decode_cached = int(h["decode_cached_tokens"])
    assert decode_cached >= usage1.prompt_tokens // block * block > 0
    pushed = int(h["kv_transfer_bytes"])
    assert pushed == (usage2.prompt_tokens - decode_cached) * KV_BYTES_PER_TOKEN + TRAILER_BYTES
    first_push = int(smol.redis.hget("cleave:req:kv-turn-1", "kv_transfer_bytes"))
    assert first_push == usage1.prompt_tokens * KV_BYTES_PER_TOKEN + TRAILER_BYTES   # turn 1: all of it
    model, tokenizer = smollm2_reference
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == usage2.prompt_tokens
    expected = hf_greedy(model, ids, 12)
    assert second.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
