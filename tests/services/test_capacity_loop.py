"""Closing the loop: a published plan read back beside measured latencies (real Redis), the
expert imbalance from a deployment's counters, and the calibration over real gloo ranks."""
from __future__ import annotations

import asyncio
import time

import pytest

from services.capacity.models import BUILTIN as MODELS
from services.capacity.hardware import BUILTIN as GPUS
from services.capacity.published import (add_plan_inputs, add_plan_view, expert_imbalance, publish,
                                         read_expert_imbalance)
from services.capacity.search import PlanRequest, plan


@pytest.mark.unit
def test_expert_imbalance_by_hand():
    counts = [[10, 10, 10, 10], [40, 0, 0, 0]]
    assert expert_imbalance(counts[:1], 2) == 1.0
    assert expert_imbalance(counts, 2) == pytest.approx(40 / 20)   # ranks hold 40 and 0
    assert expert_imbalance(counts, 4) == pytest.approx(40 / 10)
    assert expert_imbalance([], 2) == 1.0


def _with_client(redis_url: str, fn):
    """``await fn(client)`` with a fresh async Redis client, closed afterwards."""
    import redis.asyncio as aioredis

    async def run():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await fn(client)
        finally:
            await client.aclose()
    return asyncio.run(run())


def _view(redis_url: str, info):
    """``info`` after :func:`add_plan_view`."""
    _with_client(redis_url, lambda client: add_plan_view(info, client, "cleave:"))
    return info


@pytest.mark.integration
def test_published_plan_shows_next_to_measured_latencies(redis_url):
    import redis

    from cleave.v1 import inference_pb2
    from common.metrics import latency_key

    result = plan(PlanRequest(model=MODELS["llama-3.1-8b"], hardware=GPUS["h100"], gpus=8, prompt=1024,
                              output=128, rate=20, ttft_s=1.0, tpot_s=0.05))
    publish(redis_url, "cleave:", result)
    now = time.time()
    with redis.Redis.from_url(redis_url) as r:
        r.zadd(latency_key("cleave:", "tpot"), {f"r{i}:{0.02 + i / 1000}": now for i in range(10)})
        r.hset("cleave:experts:moe:0", mapping={"0": 30, "1": 10, "2": 10, "3": 10})
    assert read_expert_imbalance(redis_url, "cleave:", "moe", ep=2) == pytest.approx(40 / 30)

    pools = [inference_pb2.PoolInfo(pool="prefill", instances=1), inference_pb2.PoolInfo(pool="decode", instances=2)]
    info = _view(redis_url, inference_pb2.ModelInfo(pools=pools))
    by_pool = {c.pool: c for c in info.capacity}
    rec = result["recommendation"]["decode"]
    assert by_pool["decode"].planned_instances == rec["instances"]
    assert by_pool["decode"].predicted_latency_s == pytest.approx(rec["tpot_s"])
    assert by_pool["decode"].predicted_capacity_rps == pytest.approx(rec["capacity_rps"])
    assert by_pool["decode"].instances == 2
    assert by_pool["decode"].measured_latency_p90_s == pytest.approx(0.028)   # nearest rank: 9th of 10
    assert by_pool["prefill"].measured_latency_p90_s == 0
    assert "llama-3.1-8b on 8 x h100" in info.plan_summary


@pytest.mark.integration
def test_autoscaler_decisions_carry_the_plan(redis_url):
    from services.planner import Decision

    result = plan(PlanRequest(model=MODELS["llama-3.1-8b"], hardware=GPUS["h100"], gpus=8, prompt=1024,
                              output=128, rate=20, ttft_s=1.0, tpot_s=0.05))
    publish(redis_url, "cleave:", result)
    decisions = [Decision("prefill", 1, 1, "hold"), Decision("decode", 1, 2, "grow")]
    _with_client(redis_url, lambda client: add_plan_inputs(decisions, client, "cleave:"))
    rec = result["recommendation"]
    for d in decisions:
        assert d.inputs["plan"]["instances"] == rec[d.pool]["instances"]
        assert d.inputs["plan"]["capacity_rps"] == pytest.approx(rec[d.pool]["capacity_rps"])


@pytest.mark.integration
def test_no_plan_leaves_model_info_alone(redis_url):
    from cleave.v1 import inference_pb2

    info = _view(redis_url, inference_pb2.ModelInfo())
    assert not info.capacity and not info.plan_summary


@pytest.mark.integration
def test_the_deployable_routers_model_info_carries_the_plan(redis_url, tiny_llama_dir):
    """``cleave router`` passes ``services.router_views`` to the router; a router built without
    views answers the model and pools alone (the router imports nothing from ``services``)."""
    from cleave.v1 import inference_pb2
    from common.config import RouterConfig
    from common.registry import connect_redis
    from engine.source import load_model_config, load_tokenizer, resolve_model
    from router.core import RouterCore
    from router.server import InferenceServicer
    from router.text import TextCodec
    from services.router_views import MODEL_INFO_VIEWS

    publish(redis_url, "cleave:", plan(PlanRequest(model=MODELS["llama-3.1-8b"], hardware=GPUS["h100"], gpus=8,
                                                   prompt=1024, output=128, rate=20, ttft_s=1.0, tpot_s=0.05)))
    source = resolve_model(tiny_llama_dir)
    model, codec = load_model_config(source), TextCodec(load_tokenizer(source))

    async def info(views):
        core = RouterCore(RouterConfig(redis_url=redis_url), source.model_id, model, codec, connect_redis(redis_url))
        try:
            return await InferenceServicer(core, views).GetModelInfo(inference_pb2.GetModelInfoRequest(), None)
        finally:
            await core.client.aclose()

    bare, served = asyncio.run(info(())), asyncio.run(info(MODEL_INFO_VIEWS))
    assert not bare.capacity and not bare.plan_summary
    assert served.model_id == bare.model_id and served.vocab_size == model.vocab_size
    assert {c.pool for c in served.capacity} == {"prefill", "decode"}
    assert "llama-3.1-8b on 8 x h100" in served.plan_summary


@pytest.mark.unit
def test_cleave_router_serves_the_operator_views(monkeypatch):
    """``cleave router`` (and ``cleave serve``, which runs it) hands the views to the router."""
    import router.server
    from services import cli
    from services.router_views import MODEL_INFO_VIEWS

    seen = {}

    async def serve_router(cfg, ready=None, views=()):
        seen["views"] = views
    monkeypatch.setattr(router.server, "serve_router", serve_router)
    assert cli._run_router(cli._parser().parse_args(["router", "--redis-url", "redis://127.0.0.1:1/0"])) == 0
    assert seen["views"] == MODEL_INFO_VIEWS


@pytest.mark.integration
def test_calibration_measures_gloo_collectives_for_two_ranks():
    from services.capacity.calibrate import SIZES, measure_collectives
    measured = measure_collectives(2, reps=1)
    for op in ("all_reduce", "all_to_all", "send_recv"):
        pts = measured[op][2]
        assert [p[0] for p in pts] == list(SIZES)
        assert all(t >= 0 for _, t in pts)
        assert pts[-1][1] >= pts[0][1]                   # fitted: more bytes never take less time
