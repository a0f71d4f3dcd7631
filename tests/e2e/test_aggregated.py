"""Aggregated serving from the same binaries (issue 22): ``--prefill-instances 0``.

A real stack (router, Redis, one decode instance of the tiny Llama, no prefill instance): the
router is healthy with the decode pool alone, every request is prefilled on the decode instance
(``prefill_mode`` local), greedy tokens equal ``transformers``', a repeated conversation turn
reuses the decode instance's cache, and the router's KV index follows the decode pool exactly.
"""
from __future__ import annotations

import time

import pytest

from cleave.v1 import inference_pb2
from tests.conftest import _stack, hf_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def aggregated(request, tiny_llama_dir):
    return _stack(request, model=tiny_llama_dir, prefill_instances=0,
                  workers=dict(transport="tcp", num_blocks=64, block_size=8, threads=1))


def test_decode_instances_prefill_everything_token_exact(aggregated, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    info = aggregated.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
    assert {p.pool: p.instances for p in info.pools}.get("prefill", 0) == 0
    history = [5, 17, 99, 3, 42, 8, 77, 13, 21]
    for turn in range(3):
        prompt = history + [100 + turn, 7, 9]
        got = aggregated.generate(token_ids=prompt, max_tokens=12, ignore_eos=True, request_id=f"agg-{turn}")
        assert got.token_ids == hf_greedy(model, prompt, 12)
        h = aggregated.redis.hgetall(f"cleave:req:agg-{turn}")
        assert (h["prefill_mode"], h["prefill_reason"]) == ("local", "no prefill instance")
        assert h["prefill_worker"] == h["decode_worker"] and h["state"] == "finished"
        if turn:                                   # the decode instance kept the previous turn
            assert got.usage.cached_tokens >= len(history) - 8 > 0
        history = prompt + got.token_ids
        time.sleep(0.3)
    deadline = time.time() + 10
    while time.time() < deadline:
        info = aggregated.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        decode = next(p for p in info.pools if p.pool == "decode")
        if decode.kv_index_mode == "exact" and decode.kv_index_blocks > 0:
            break
        time.sleep(0.2)
    assert decode.kv_index_mode == "exact" and decode.kv_index_blocks > 0
