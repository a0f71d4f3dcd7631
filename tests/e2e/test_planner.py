"""The planner's local backend on the real stack: draining loses nothing, and a burst grows
the prefill pool (only) from 1 to 2 instances, which shrinks back when the burst is over."""
from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cleave.v1 import inference_pb2
from services.launcher import StackConfig, workers
from services.planner import PlannerConfig
from services.scaling_local import LocalBackend, PlannerThread
from tests.conftest import hf_greedy
from tests.stack import RunningStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

WORKER = dict(transport="tcp", block_size=8, threads=1)
PROMPTS = [[5 + i, 17, 3 * i + 1, 40, 2, 9, 11 + i] * (1 + i % 3) for i in range(4)]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    from tests.models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-planner")
    make_tiny_llama(str(path), seed=5, max_position_embeddings=2048)
    return str(path)


@pytest.fixture(scope="module")
def reference(long_model_dir):
    """Greedy continuations of PROMPTS by transformers, the correctness reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(long_model_dir, dtype=torch.float32).eval()
    return functools.cache(lambda i, n: hf_greedy(model, PROMPTS[i], n))


def _stack(request, model_dir, **kw) -> RunningStack:
    running = RunningStack(StackConfig(port=0, log_level="WARNING", model=model_dir, **kw))
    request.addfinalizer(running.close)
    return running


def _wait_routed(running: RunningStack, pool: str, n: int, timeout: float = 120) -> None:
    """Wait until the router routes to ``n`` instances of ``pool`` (it reports them in GetModelInfo)."""
    deadline = time.time() + timeout
    while True:
        info = running.stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)
        if next(p.instances for p in info.pools if p.pool == pool) == n:
            return
        assert time.time() < deadline, f"the router never saw {n} {pool} instances"
        time.sleep(0.1)


def _record_of(running: RunningStack, name: str):
    """The registry record of the stack's process ``name`` (e.g. "decode-1"); None until it registers."""
    pids = [p.pid for n, p in running.stack.procs if n == name]
    return next((r for r in running.workers() if r.pid in pids), None)


def test_scaling_down_drains_without_losing_requests(request, long_model_dir, reference):
    running = _stack(request, long_model_dir, decode_instances=2,
                     **workers(**WORKER, num_blocks=600, drain_timeout_s=120.0))
    _wait_routed(running, "decode", 2)  # ready means one instance per pool; here both must be
    retiring = _record_of(running, "decode-1")
    n = 500
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(running.generate, token_ids=p, max_tokens=n, ignore_eos=True,
                               request_id=f"drain-{i}", timeout=300) for i, p in enumerate(PROMPTS)]
        # wait until the instance to retire is decoding, then scale the pool down under it
        deadline = time.time() + 60
        while not any(running.redis.hget(f"cleave:req:drain-{i}", "decode_worker") == retiring.worker_id
                      for i in range(len(PROMPTS))):
            assert time.time() < deadline, "decode-1 never got a request"
            time.sleep(0.02)
        LocalBackend(running.stack).scale("decode", 1)
        mine = [f"cleave:req:drain-{i}" for i in range(len(PROMPTS))
                if running.redis.hget(f"cleave:req:drain-{i}", "decode_worker") == retiring.worker_id]
        assert any(running.redis.hget(k, "state") != "finished" for k in mine), "nothing left to drain"
        assert running.stack.workers("decode") == ["decode-0"]
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        assert result.token_ids == reference(i, n), f"request {i} differs from transformers"
    hashes = [running.redis.hgetall(f"cleave:req:drain-{i}") for i in range(len(PROMPTS))]
    drained = [h for h in hashes if h["decode_worker"] == retiring.worker_id]
    assert drained, "no request ran on the retired instance"
    assert all(h["attempts"] == "1" and h["state"] == "finished" for h in drained), \
        "the retired instance must finish its requests itself, not hand them to a retry"
    proc = next(p for name, p in running.stack.procs if name == "decode-1")
    assert proc.wait(timeout=60) == 0 and running.stack.dead() is None
    assert [r.worker_id for r in running.workers() if r.pool == "decode"] == [_record_of(running, "decode-0").worker_id]
    # the pool still serves, on the instance that stayed
    assert running.generate(token_ids=PROMPTS[0], max_tokens=8, ignore_eos=True).token_ids == reference(0, 8)


def test_burst_grows_prefill_only_and_idle_shrinks_it(request, long_model_dir, reference):
    running = _stack(request, long_model_dir, **workers(**WORKER, num_blocks=1024))
    cfg = PlannerConfig(interval_s=0.5, window_s=3, prefill_max=2, decode_max=2, ttft_target_s=0.01,
                        queue_target_tokens=64, tpot_target_s=60, kv_high=0.95, kv_low=0.5,
                        cooldown_up_s=1, cooldown_down_s=4)
    planner = PlannerThread(running.stack, cfg).start()
    request.addfinalizer(planner.stop)
    backend = LocalBackend(running.stack)
    n, stop, results, sizes = 8, threading.Event(), [], []

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            j = (k + i) % len(PROMPTS)
            results.append((j, running.generate(token_ids=PROMPTS[j], max_tokens=n, ignore_eos=True,
                                                request_id=f"burst-{k}-{i}", timeout=120)))
            i += 1

    def second_prefill_served() -> bool:
        second = _record_of(running, "prefill-1")
        return second is not None and any(running.redis.hget(k, "prefill_worker") == second.worker_id
                                           for k in running.redis.scan_iter("cleave:req:burst-*"))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, k) for k in range(6)]
        deadline = time.time() + 180
        while not second_prefill_served():
            sizes.append((backend.replicas("prefill"), backend.replicas("decode")))
            assert time.time() < deadline, f"the prefill pool did not grow and serve: {planner.planner.history}"
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    grown = [d for d in planner.planner.history if d.pool == "prefill" and d.desired > d.current]
    assert grown and grown[0].current == 1 and grown[0].desired == 2
    # shrinks back once idle for the cooldown, draining the extra instance
    deadline = time.time() + 90
    while backend.replicas("prefill") != 1 or len([r for r in running.workers() if r.pool == "prefill"]) != 1:
        sizes.append((backend.replicas("prefill"), backend.replicas("decode")))
        assert time.time() < deadline, f"the prefill pool did not shrink: {planner.planner.history}"
        time.sleep(0.2)
    assert all(d.pool == "prefill" for d in planner.planner.history), planner.planner.history
    assert {d for _, d in sizes} == {1} and max(p for p, _ in sizes) == 2
    assert running.stack.dead() is None
    assert len(results) >= 6
    for j, result in results:  # every request of the burst completed, and correctly
        assert result.token_ids == reference(j, n)
