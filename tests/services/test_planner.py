"""The planner's decisions as a pure function over recorded load snapshots, and reading them from Redis."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis.asyncio as aioredis

from common.metrics import MetricsWriter, percentile
from common.registry import Heartbeat, WorkerRecord
from services.planner import PlannerConfig, PlannerState, PoolLoad, collect_loads, decide

CFG = PlannerConfig(interval_s=1, window_s=10, prefill_min=1, prefill_max=4, decode_min=1, decode_max=3,
                    ttft_target_s=1.0, queue_target_tokens=1000, tpot_target_s=0.1, kv_high=0.8, kv_low=0.3,
                    cooldown_up_s=5, cooldown_down_s=30, max_step=2)
IDLE = {"prefill": PoolLoad("prefill", instances=1), "decode": PoolLoad("decode", instances=1)}


def run(snapshots, replicas=None, cfg=CFG, start=1000.0, step=1.0):
    """Feed (loads) snapshots one per ``step`` seconds, applying each decision like a backend would."""
    replicas = dict(replicas or {"prefill": 1, "decode": 1})
    state, history = PlannerState(), []
    for i, loads in enumerate(snapshots):
        loads = {p: PoolLoad(**{**l.__dict__, "instances": replicas[p]}) for p, l in loads.items()}
        decisions, state = decide(cfg, loads, replicas, state, start + i * step)
        for d in decisions:
            assert d.current == replicas[d.pool]
            if d.changes:
                history.append((i, d.pool, d.current, d.desired))
                replicas[d.pool] = d.desired
    return history, replicas


def surge(**prefill) -> dict:
    return {"prefill": PoolLoad("prefill", **prefill), "decode": PoolLoad("decode", kv_utilization=0.4)}


@pytest.mark.unit
def test_prefill_surge_grows_prefill_only():
    history, replicas = run([surge(queued_tokens=2500, latency_p90=0.5)] * 3)
    # 2500 queued tokens on one instance is 2.5x the target: grow to ceil(2.5) = 3, within max_step
    assert history == [(0, "prefill", 1, 3)]
    assert replicas == {"prefill": 3, "decode": 1}


@pytest.mark.unit
def test_ttft_surge_grows_prefill_but_not_while_decode_is_full():
    history, _ = run([surge(latency_p90=1.5)])
    assert history == [(0, "prefill", 1, 2)]
    # the same TTFT while requests wait for decode KV room is decode's fault: decode grows
    waiting = {"prefill": PoolLoad("prefill", latency_p90=1.5, waiting_for_kv=3),
               "decode": PoolLoad("decode", kv_utilization=0.95, waiting_for_kv=3)}
    history, replicas = run([waiting])
    assert history == [(0, "decode", 1, 2)] and replicas["prefill"] == 1


@pytest.mark.unit
@pytest.mark.parametrize("decode", [PoolLoad("decode", kv_utilization=0.9),
                                    PoolLoad("decode", kv_utilization=0.5, latency_p90=0.25),
                                    PoolLoad("decode", kv_utilization=0.5, waiting_for_kv=1)])
def test_decode_pressure_grows_decode_only(decode):
    history, replicas = run([{"prefill": PoolLoad("prefill"), "decode": decode}] * 3)
    assert {h[1] for h in history} == {"decode"} and history[0][2] == 1 and history[0][3] >= 2
    assert replicas["prefill"] == 1


@pytest.mark.unit
def test_growth_waits_for_cooldown_and_for_started_instances():
    cfg = PlannerConfig(**{**CFG.__dict__, "max_step": 1})
    busy = {"prefill": PoolLoad("prefill", queued_tokens=10_000, instances=1), "decode": PoolLoad("decode", instances=1)}
    state = PlannerState()
    d, state = decide(cfg, busy, {"prefill": 1, "decode": 1}, state, 100.0)
    assert d[0].desired == 2
    # the new instance has not registered yet: hold even after the cooldown
    loads = {**busy, "prefill": PoolLoad("prefill", queued_tokens=10_000, instances=1)}
    d, state = decide(cfg, loads, {"prefill": 2, "decode": 1}, state, 200.0)
    assert d[0].desired == 2 and "starting" in d[0].reason
    loads["prefill"] = PoolLoad("prefill", queued_tokens=10_000, instances=2)
    d, state = decide(cfg, loads, {"prefill": 2, "decode": 1}, state, 201.0)
    assert d[0].desired == 3
    loads["prefill"] = PoolLoad("prefill", queued_tokens=10_000, instances=3)
    d, _ = decide(cfg, loads, {"prefill": 3, "decode": 1}, state, 203.0)   # 2 s < cooldown_up 5 s
    assert d[0].desired == 3 and "cooling down" in d[0].reason


@pytest.mark.unit
def test_shrinks_one_at_a_time_after_cooldown_only():
    # a surge, then silence: nothing shrinks for cooldown_down_s after the last busy round
    snapshots = [surge(queued_tokens=3500)] * 2 + [IDLE] * 100
    history, replicas = run(snapshots, step=1.0)
    assert history[0] == (0, "prefill", 1, 3)
    downs = [h for h in history if h[3] < h[2]]
    assert [h[2:] for h in downs] == [(3, 2), (2, 1)]
    assert downs[0][0] - 1 >= CFG.cooldown_down_s            # idle since round 2
    assert downs[1][0] - downs[0][0] >= CFG.cooldown_down_s  # and again after each change
    assert replicas == {"prefill": 1, "decode": 1}


@pytest.mark.unit
def test_hysteresis_band_holds():
    # 600 queued tokens on 2 instances: under target (0.3x) but 1 instance would hold 600 > 500
    history, replicas = run([surge(queued_tokens=600)] * 100, replicas={"prefill": 2, "decode": 1})
    assert history == [] and replicas["prefill"] == 2
    # decode at 20% over 2 instances: one would be at 40% > kv_low: stays
    loads = {"prefill": PoolLoad("prefill"), "decode": PoolLoad("decode", kv_utilization=0.2)}
    history, _ = run([loads] * 100, replicas={"prefill": 1, "decode": 2})
    assert history == []


@pytest.mark.unit
def test_never_beyond_bounds():
    rng = random.Random(7)
    snapshots = [{"prefill": PoolLoad("prefill", queued_tokens=rng.choice([0, 100, 5000, 50_000]),
                                      latency_p90=rng.choice([None, 0.1, 3.0])),
                  "decode": PoolLoad("decode", kv_utilization=rng.random(), latency_p90=rng.choice([None, 0.01, 1.0]),
                                     waiting_for_kv=rng.choice([0, 0, 2]))} for _ in range(400)]
    history, _ = run(snapshots, step=7.0)
    assert history, "random load should move the pools"
    for _, pool, _, desired in history:
        lo, hi = CFG.bounds(pool)
        assert lo <= desired <= hi
    # replicas outside the bounds (an operator scaled by hand) are brought back at once
    history, replicas = run([IDLE], replicas={"prefill": 9, "decode": 0})
    assert replicas == {"prefill": 4, "decode": 1}


@pytest.mark.unit
@pytest.mark.parametrize("bad", [dict(prefill_min=3, prefill_max=2), dict(decode_max=0), dict(kv_low=0.9),
                                 dict(ttft_target_s=0), dict(low_fraction=1.0), dict(max_step=0)])
def test_config_rejects_inconsistent_values(bad):
    with pytest.raises(ValueError):
        PlannerConfig(**bad)


@pytest.mark.unit
def test_percentile():
    assert percentile([], 0.9) is None
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert percentile([float(i) for i in range(1, 11)], 0.5) == 5.0


@pytest.mark.integration
def test_collect_loads_reads_workers_and_router_metrics(redis_url):
    async def scenario():
        client = aioredis.from_url(redis_url, decode_responses=True)
        prefix = f"t{time.time_ns()}:"

        def record(pool, wid, draining=False, **load):
            return WorkerRecord(pool=pool, worker_id=wid, address=f"h:{wid}", incarnation="i",
                                layout={}, capacity={"total_blocks": 100, "block_size": 16},
                                load=load, draining=draining)
        for rec in (record("prefill", "p0", queued_tokens=300, running=1),
                    record("prefill", "p1", queued_tokens=200, draining=True),
                    record("decode", "d0", free_blocks=20, running=5),
                    record("decode", "d1", free_blocks=80, running=1)):
            await Heartbeat(client, prefix, lambda rec=rec: rec, 1, 10).beat()
        writer = MetricsWriter(client, prefix, "r1", window_s=60)
        for i, ttft in enumerate([0.1, 0.2, 0.3, 5.0]):
            await writer.sample("ttft", f"req{i}", ttft)
        await writer.sample("tpot", "req0", 0.05)
        await writer.publish(waiting_for_kv=2, active=7)
        loads = await collect_loads(client, prefix, window_s=60)
        stale = await collect_loads(client, prefix, window_s=60, now=time.time() + 120)
        await client.aclose()
        return loads, stale

    loads, stale = asyncio.run(scenario())
    p, d = loads["prefill"], loads["decode"]
    assert (p.instances, p.queued_tokens, p.running, p.latency_p90) == (1, 500, 1, 5.0)
    assert (d.instances, d.running, d.latency_p90, d.waiting_for_kv) == (2, 6, 0.05, 2)
    assert d.kv_utilization == pytest.approx(0.5)
    assert stale["prefill"].latency_p90 is None  # samples older than the window are ignored
