"""The fault report's inputs against the real stack (SmolLM2, one prefill and one decode instance).

One request's parameters never fail another's stream; tiny temperatures sample like greedy;
bad ids, bad bytes and oversized prompts get INVALID_ARGUMENT; internal APIs want the token;
cancels and deadlines are recorded as what they were, in Redis, with an expiry.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from cleave.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from tests.stack import request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _wait_state(stack, rid, states=("finished", "failed", "cancelled"), timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = stack.redis.hgetall(f"cleave:req:{rid}")
        if h.get("state") in states or time.time() > deadline:
            return h
        time.sleep(0.05)


def test_tiny_temperatures_never_fail_an_innocent_batch_mate(smollm2_stack):
    """Input 1 of the report: an innocent greedy stream runs while three requests with
    temperature 6.2e-38 arrive; every stream ends on its first attempt, the innocent one with
    exactly its solo tokens, the others with greedy output."""
    stack = smollm2_stack
    innocent = dict(prompt="Once upon a time", max_tokens=48, temperature=0.0, ignore_eos=True)
    solo = stack.generate(**innocent)
    greedy = stack.generate(prompt="The capital of France is", max_tokens=8)
    assert "Paris" in greedy.text

    got = {}
    runner = threading.Thread(target=lambda: got.setdefault(
        "innocent", stack.generate(request_id="innocent-1", **innocent)))
    runner.start()
    for i in range(3):
        got[f"hot{i}"] = stack.generate(prompt="The capital of France is", max_tokens=8,
                                        temperature=6.2e-38, request_id=f"hot-{i}")
    runner.join(120)
    assert got["innocent"].token_ids == solo.token_ids
    for i in range(3):
        assert got[f"hot{i}"].token_ids == greedy.token_ids
    for rid in ["innocent-1", "hot-0", "hot-1", "hot-2"]:
        h = _wait_state(stack, rid)
        assert h["state"] == "finished" and h["attempts"] == "1", (rid, h)


@pytest.mark.parametrize("sampling", [dict(temperature=1e-38, seed=1), dict(temperature=1.4e-45, seed=1),
                                      dict(temperature=1.0, top_p=1e-9, seed=1),
                                      dict(temperature=1.0, top_k=4_000_000_000, top_p=1e-30, seed=2)])
def test_degenerate_sampling_parameters_behave_as_greedy(smollm2_stack, sampling):
    stack = smollm2_stack
    greedy = stack.generate(prompt="The capital of France is", max_tokens=8)
    assert stack.generate(prompt="The capital of France is", max_tokens=8, **sampling).token_ids == greedy.token_ids


@pytest.mark.parametrize("rid", ["t2-nl\n", "a" * 128 + "\n"])
def test_request_id_with_a_trailing_newline_is_invalid(smollm2_stack, rid):
    with pytest.raises(grpc.RpcError) as err:
        smollm2_stack.generate(prompt="hi", max_tokens=2, request_id=rid)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not smollm2_stack.redis.exists(f"cleave:req:{rid}")


@pytest.mark.parametrize("method,kind,payload", [
    ("/cleave.v1.Inference/Generate", "stream", b"\x12\x02\xff\xfe"),   # prompt: invalid UTF-8
    ("/cleave.v1.Inference/Generate", "stream", b"\x22\x09\x08"),         # sampling: truncated
    ("/cleave.v1.Inference/GetModelInfo", "unary", b"\x0a\x05ab"),        # truncated
])
def test_undecodable_bytes_get_invalid_argument(smollm2_stack, method, kind, payload):
    channel = smollm2_stack.channel
    call = (channel.unary_stream if kind == "stream" else channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        result = call(payload, timeout=10)
        if kind == "stream":
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid cleave.v1." in err.value.details()


def test_a_multi_megabyte_prompt_is_refused_without_tokenizing(smollm2_stack):
    with pytest.raises(grpc.RpcError) as err:
        smollm2_stack.generate(prompt="word " * 780_000, max_tokens=4)  # 3.9 MB
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters" in err.value.details() and "shorten it" in err.value.details()


def test_internal_apis_refuse_callers_without_the_token(smollm2_stack):
    rec = next(r for r in smollm2_stack.workers() if r.pool == "decode")
    with grpc.insecure_channel(rec.address) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        reserve = worker_pb2.ReserveRequest(request_id="intruder", num_prompt_tokens=8, max_tokens=8,
                                            deadline_unix=time.time() + 3600)
        for call in (lambda: stub.Reserve(reserve, timeout=10),
                     lambda: stub.Abort(worker_pb2.AbortRequest(request_id="someone-else"), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_cancel_within_milliseconds_is_recorded(smollm2_stack):
    stack = smollm2_stack
    stream = stack.stub.Generate(request(prompt="Tell me a long story", max_tokens=64,
                                         request_id="early-cancel"), timeout=60)
    time.sleep(0.005)
    stream.cancel()
    h = _wait_state(stack, "early-cancel")
    assert h["state"] == "cancelled" and "cancelled" in h["error"]
    assert 0 < stack.redis.ttl("cleave:req:early-cancel")


def test_a_passed_deadline_is_recorded_as_a_deadline(smollm2_stack):
    stack = smollm2_stack
    with pytest.raises(grpc.RpcError) as err:
        for _ in stack.stub.Generate(request(prompt="Count to a thousand", max_tokens=400, ignore_eos=True,
                                             request_id="deadline-1"), timeout=1.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    h = _wait_state(stack, "deadline-1")
    assert h["state"] == "failed" and "deadline" in h["error"], h
    assert 0 < stack.redis.ttl("cleave:req:deadline-1")


def test_request_hashes_expire_even_while_running(smollm2_stack):
    stack = smollm2_stack
    stream = stack.stub.Generate(request(prompt="Write a poem", max_tokens=200, ignore_eos=True,
                                         request_id="live-ttl"), timeout=120)
    next(stream)
    assert stack.redis.hget("cleave:req:live-ttl", "state") in ("queued", "prefilling", "transferring", "decoding")
    assert 0 < stack.redis.ttl("cleave:req:live-ttl")  # a router crash now would not leave it forever
    stream.cancel()
    info = stack.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
    assert info.model_id  # still serving
