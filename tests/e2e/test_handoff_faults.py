"""KV handoff faults through the whole stack (issue 4): each ends the request with a clear
status and leaves every worker's free-block count where it started."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from tests.stack import request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _stack(model_dir, decode=None, router=None, decode_instances=1, block_size=8, transport="ucx"):
    from common.config import RouterConfig
    from services.launcher import StackConfig, workers
    from tests.stack import RunningStack

    return RunningStack(StackConfig(
        port=0, model=model_dir, log_level="WARNING", decode_instances=decode_instances,
        router=RouterConfig(**(router or {})),
        **workers(transport=transport, num_blocks=300, threads=1, prefill={"block_size": block_size},
                  decode=decode or {"block_size": 8})))


def test_compatibility_mismatch_fails_before_any_token(tiny_llama_dir):
    stack = _stack(tiny_llama_dir, block_size=16)  # prefill blocks of 16, decode blocks of 8
    try:
        before = stack.free_blocks()
        stream = stack.stub.Generate(request(token_ids=[1, 2, 3], max_tokens=4), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            next(stream)  # not even token 1: the mismatch is found before prefill runs
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "compat hash" in err.value.details() and "--block-size" in err.value.details()
        assert stack.wait_free_blocks(before) == before
    finally:
        stack.close()


def test_transfer_deadline_that_passes_is_unavailable(tiny_llama_dir):
    # 400 tokens of KV over TCP cannot move in 0.1 ms: every push misses its deadline
    stack = _stack(tiny_llama_dir, router={"transfer_timeout_s": 0.0001}, transport="tcp")
    try:
        before = stack.free_blocks()
        with pytest.raises(grpc.RpcError) as err:
            stack.generate(token_ids=[i % 250 for i in range(1, 401)], max_tokens=4, request_id="late-1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "deadline" in err.value.details()
        assert stack.wait_free_blocks(before) == before
        deadline = time.time() + 5
        while stack.redis.hget("cleave:req:late-1", "state") != "failed" and time.time() < deadline:
            time.sleep(0.05)
        assert "deadline" in stack.redis.hget("cleave:req:late-1", "error")
    finally:
        stack.close()


def test_client_cancel_during_transfer_frees_both_sides(tiny_stack):
    before = tiny_stack.free_blocks()
    stream = tiny_stack.stub.Generate(request(token_ids=list(range(1, 200)), max_tokens=100,
                                              request_id="cancel-in-transfer"), timeout=60)
    next(stream)  # token 1 comes from prefill while its KV is still on the way
    stream.cancel()
    assert tiny_stack.wait_free_blocks(before) == before
    deadline = time.time() + 10
    while tiny_stack.redis.hget("cleave:req:cancel-in-transfer", "state") != "cancelled" and time.time() < deadline:
        time.sleep(0.05)
    assert tiny_stack.redis.hget("cleave:req:cancel-in-transfer", "state") == "cancelled"


def test_decode_peer_that_vanishes_before_the_push_is_retried(tmp_path):
    from tests.models import make_tiny_llama

    make_tiny_llama(str(tmp_path), seed=5, max_position_embeddings=4096)
    stack = _stack(str(tmp_path), decode_instances=2, router={"transfer_timeout_s": 5.0})
    try:
        prompt = [(7 * i) % 250 for i in range(1, 2000)]   # a long prompt: prefill takes a while
        expected = stack.generate(token_ids=prompt, max_tokens=8)
        stream = stack.stub.Generate(request(token_ids=prompt, max_tokens=8, request_id="vanish-1"), timeout=120)
        victim, deadline = None, time.time() + 30
        while victim is None and time.time() < deadline:  # kill the reserving decode worker
            h = stack.redis.hgetall("cleave:req:vanish-1")
            if h.get("state") == "prefilling" and h.get("decode_worker"):
                victim = h["decode_worker"]
            time.sleep(0.002)
        assert victim is not None
        os.kill(next(r.pid for r in stack.workers() if r.worker_id == victim), signal.SIGKILL)
        got = [t for msg in stream for t in msg.token_ids]
        assert got == expected.token_ids
        h = stack.redis.hgetall("cleave:req:vanish-1")
        assert h["decode_worker"] != victim and int(h["attempts"]) >= 2
        survivors = stack.free_blocks(exclude=(victim,))
        assert len(survivors) == 2 and all(n == 299 for n in survivors.values()), survivors
    finally:
        stack.close()
