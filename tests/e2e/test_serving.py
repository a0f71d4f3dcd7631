"""The whole stack as processes: router -> prefill -> KV over UCX/TCP -> decode -> stream.

Every test checks, on the way out, that each worker's free-block count is back where it was.
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cleave.v1 import inference_pb2
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROMPTS = ["The capital of France is", "Write a haiku about GPUs.", "def fibonacci(n):\n",
           "Les trois couleurs du drapeau français sont"]
STOP = inference_pb2.FINISH_REASON_STOP
LENGTH = inference_pb2.FINISH_REASON_LENGTH


def _guard_blocks(stack):
    before = stack.free_blocks()
    assert before and all(v > 0 for v in before.values())
    yield stack
    assert stack.wait_free_blocks(before) == before, "KV blocks leaked"


@pytest.fixture
def smol(smollm2_stack):
    yield from _guard_blocks(smollm2_stack)


@pytest.fixture
def tiny(tiny_stack):
    yield from _guard_blocks(tiny_stack)


def test_smollm2_greedy_matches_transformers(smol, smollm2_reference):
    model, tokenizer = smollm2_reference
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        expected = hf_greedy(model, ids, 32)
        by_ids = smol.generate(token_ids=ids, max_tokens=32)
        assert by_ids.token_ids == expected, prompt
        by_text = smol.generate(prompt=prompt, max_tokens=32)
        assert by_text.token_ids == expected, prompt
        assert by_text.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert by_text.usage.prompt_tokens == len(ids)
        assert by_text.usage.completion_tokens == len(expected)
        assert by_text.finish_reason == (STOP if len(expected) < 32 else LENGTH)


def test_chat_is_rendered_with_the_template(smol, smollm2_reference):
    model, tokenizer = smollm2_reference
    chat = [("system", "You are terse."), ("user", "Name a primary colour.")]
    ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat],
                                        add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    expected = hf_greedy(model, ids, 16)
    got = smol.generate(chat=chat, max_tokens=16)
    assert got.token_ids == expected
    assert got.usage.prompt_tokens == len(ids)


def test_tiny_llama_safetensors_greedy_matches_transformers(tiny, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for ids in ([5, 17, 99, 3], list(range(40, 77)), [200] * 9, list(b"hello, world")):
        expected = hf_greedy(model, ids, 32)
        got = tiny.generate(token_ids=ids, max_tokens=32)
        assert got.token_ids == expected
    # streamed text joins to exactly the decode of all tokens (byte tokens: split UTF-8 too)
    got = tiny.generate(prompt="naïve café — 日本", max_tokens=48, ignore_eos=True)
    from engine.loader import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model(tiny_llama_dir))
    assert got.text == tok.decode(got.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any(chunk.endswith("\ufffd") for chunk in got.chunks[:-1])


def test_concurrent_streams_equal_each_alone(smol):
    cases = [dict(prompt=p, max_tokens=n) for p, n in zip(PROMPTS * 2, (8, 24, 12, 20, 16, 10, 22, 14))]
    cases[5].update(temperature=0.9, top_p=0.9, seed=7)
    cases[6].update(temperature=1.2, top_k=40, seed=11, ignore_eos=True)
    alone = [smol.generate(**c) for c in cases]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: smol.generate(**c), cases))
    for a, b, c in zip(alone, together, cases):
        assert a.token_ids == b.token_ids, c
        assert a.text == b.text


def test_seeded_sampling_is_reproducible(tiny):
    a = tiny.generate(token_ids=[1, 2, 3], max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    b = tiny.generate(token_ids=[1, 2, 3], max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    c = tiny.generate(token_ids=[1, 2, 3], max_tokens=24, temperature=1.0, seed=99, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len(a.token_ids) == 24 and a.finish_reason == LENGTH


def test_stop_string_ends_the_stream_before_it(tiny):
    full = tiny.generate(prompt="abc", max_tokens=40, ignore_eos=True)
    stop = full.text[10:13]
    assert len(stop) == 3
    cut = full.text.index(stop)
    got = tiny.generate(prompt="abc", max_tokens=40, ignore_eos=True, stop=[stop])
    assert got.text == full.text[:cut]
    assert got.finish_reason == STOP
    assert got.token_ids == full.token_ids[:len(got.token_ids)]


def test_max_tokens_one_comes_from_prefill_alone(tiny):
    got = tiny.generate(token_ids=[9, 8, 7], max_tokens=1)
    full = tiny.generate(token_ids=[9, 8, 7], max_tokens=5)
    assert got.token_ids == full.token_ids[:1] and got.finish_reason == LENGTH


@pytest.mark.parametrize("req, needle", [
    (dict(prompt="", max_tokens=4), "prompt is empty"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=10_000_000), "max_tokens"),
    (dict(token_ids=[1] * 500, max_tokens=100), "context length"),
    (dict(chat=[("wizard", "hi")], max_tokens=4), "unknown role"),
    (dict(token_ids=[1, 2, 10_000_000], max_tokens=4), "vocabulary"),
    (dict(token_ids=[], max_tokens=4), "empty"),
    (dict(max_tokens=4), "no input"),
    (dict(prompt="hi", max_tokens=4, temperature=-1.0), "temperature"),
    (dict(prompt="hi", max_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt="hi", max_tokens=4, stop=[""]), "stop"),
    (dict(prompt="hi", max_tokens=4, request_id="bad id!"), "request_id"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(tiny, req, needle):
    with pytest.raises(grpc.RpcError) as err:
        tiny.generate(**req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert tiny.generate(token_ids=[1, 2], max_tokens=3).finish_reason in (STOP, LENGTH)


def test_request_larger_than_any_decode_instance_is_resource_exhausted(tiny):
    with pytest.raises(grpc.RpcError) as err:
        tiny.generate(token_ids=[1] * 380, max_tokens=4)  # fits the context, not the KV cache (376 slots)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the prompt (380 tokens, + 1 to decode into) is more KV than any decode instance holds" \
        in err.value.details()


def test_request_waits_for_kv_room_then_succeeds(tiny):
    """Backpressure: while a long request holds most blocks, the next one queues, then runs."""
    with cf.ThreadPoolExecutor(2) as pool:
        big = pool.submit(tiny.generate, token_ids=[4] * 8, max_tokens=300, ignore_eos=True)
        time.sleep(0.5)
        small = pool.submit(tiny.generate, token_ids=[5] * 8, max_tokens=150, ignore_eos=True)
        assert len(big.result().token_ids) == 300
        assert len(small.result().token_ids) == 150


def test_client_cancel_mid_stream_frees_blocks(tiny):
    stream = tiny.stub.Generate(__import__("tests.stack", fromlist=["request"]).request(
        token_ids=[3, 4, 5], max_tokens=300, ignore_eos=True, request_id="cancel-me"), timeout=60)
    first = next(stream)
    assert first.token_ids
    next(stream)
    stream.cancel()
    deadline = time.time() + 10
    while tiny.redis.hget("cleave:req:cancel-me", "state") != "cancelled" and time.time() < deadline:
        time.sleep(0.1)
    assert tiny.redis.hget("cleave:req:cancel-me", "state") == "cancelled"


def test_redis_hash_of_a_finished_request(tiny):
    t0 = time.time()
    got = tiny.generate(token_ids=[11, 12, 13, 14], max_tokens=6, request_id="hash-check-1")
    deadline = time.time() + 5
    while tiny.redis.hget("cleave:req:hash-check-1", "state") != "finished" and time.time() < deadline:
        time.sleep(0.05)
    h = tiny.redis.hgetall("cleave:req:hash-check-1")
    assert h["state"] == "finished"
    assert int(h["prompt_tokens"]) == 4
    assert int(h["completion_tokens"]) == len(got.token_ids)
    assert int(h["max_tokens"]) == 6
    assert h["finish_reason"] in ("length", "stop")
    assert h["prefill_worker"].startswith("prefill-") and h["decode_worker"].startswith("decode-")
    assert t0 - 1 <= float(h["t_arrival"]) <= float(h["t_first_token"]) <= float(h["t_finish"]) <= time.time() + 1
    assert h["error"] == "" and int(h["attempts"]) == 1
    assert 0 < tiny.redis.ttl("cleave:req:hash-check-1") <= 3600


def test_health_reflection_and_model_info(tiny):
    health = health_pb2_grpc.HealthStub(tiny.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(tiny.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"cleave.v1.Inference", "grpc.health.v1.Health"} <= names
    info = tiny.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=5)
    assert info.architecture == "llama" and info.vocab_size == 384 and info.max_context_length == 512
    assert {p.pool: p.instances for p in info.pools} == {"prefill": 1, "decode": 1}
    assert all(p.layout.tp == 1 for p in info.pools)
