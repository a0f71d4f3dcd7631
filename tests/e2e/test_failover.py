"""Failure rules of DESIGN §4 on the real stack: a decode instance dies mid-stream and the
router continues the same stream on another one, with nothing lost or repeated."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.stack import request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def two_decode_stack(request_fixture_dir):
    from services.launcher import StackConfig, workers
    from tests.stack import RunningStack

    running = RunningStack(StackConfig(
        port=0, log_level="WARNING", model=request_fixture_dir, prefill_instances=2, decode_instances=2,
        **workers(transport="tcp", num_blocks=400, block_size=8, threads=1)))
    yield running
    running.close()


@pytest.fixture(scope="module")
def request_fixture_dir(tmp_path_factory):
    from tests.models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-long")
    make_tiny_llama(str(path), seed=3, max_position_embeddings=2048)
    return str(path)


def test_decode_death_mid_stream_continues_the_same_stream(two_decode_stack):
    stack = two_decode_stack
    prompt, n = [7, 8, 9, 10], 1500
    expected = stack.generate(token_ids=prompt, max_tokens=n, ignore_eos=True, timeout=300)
    assert len(expected.token_ids) == n

    stream = stack.stub.Generate(request(token_ids=prompt, max_tokens=n, ignore_eos=True,
                                         request_id="failover-1"), timeout=300)
    got = list(next(stream).token_ids) + list(next(stream).token_ids)
    victim = stack.redis.hget("cleave:req:failover-1", "decode_worker")
    pid = next(r.pid for r in stack.workers() if r.worker_id == victim)
    os.kill(pid, signal.SIGKILL)
    finish = None
    for msg in stream:
        got.extend(msg.token_ids)
        finish = msg
    assert got == expected.token_ids  # nothing lost, nothing repeated, same greedy tokens
    assert finish.usage.completion_tokens == n
    deadline = time.time() + 5
    while stack.redis.hget("cleave:req:failover-1", "state") != "finished" and time.time() < deadline:
        time.sleep(0.05)
    h = stack.redis.hgetall("cleave:req:failover-1")
    assert h["state"] == "finished" and int(h["attempts"]) == 2
    assert h["decode_worker"] != victim


def test_dead_prefill_instance_is_retried_on_another(two_decode_stack):
    stack = two_decode_stack
    prompt = [21, 22, 23]
    expected = stack.generate(token_ids=prompt, max_tokens=12)
    prefills = sorted((r for r in stack.workers() if r.pool == "prefill"), key=lambda r: r.worker_id)
    victim = prefills[0]                     # least-load ties go to the lowest worker id
    os.kill(victim.pid, signal.SIGKILL)      # its registry record lives on until its TTL
    got = stack.generate(token_ids=prompt, max_tokens=12, request_id="prefill-retry-1")
    assert got.token_ids == expected.token_ids
    deadline = time.time() + 5
    while stack.redis.hget("cleave:req:prefill-retry-1", "state") != "finished" and time.time() < deadline:
        time.sleep(0.05)
    h = stack.redis.hgetall("cleave:req:prefill-retry-1")
    assert h["prefill_worker"] == prefills[1].worker_id
    assert int(h["attempts"]) == 2
