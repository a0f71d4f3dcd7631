"""The plan kept in Redis next to what the deployment measures, so an operator sees when the
cost model is wrong; and the expert load a deployment measured, read back into the plan.

Who calls what: ``cleave plan --publish --redis-url URL`` calls :func:`publish`, which stores
the recommendation as JSON under ``<prefix>plan`` (a STRING, no TTL: it describes the
deployment until the next plan). The autoscaler (``services.planner.Planner.tick``) logs each
pool's plan entry with its decision inputs (:func:`add_plan_inputs`). The router's
``GetModelInfo`` calls :func:`add_plan_view` (through ``services.router_views``),
which fills ``ModelInfo.capacity`` (fields 30-39): per pool the planned layout and instance
count, the predicted capacity per instance (requests/s) and latency (TTFT for prefill, TPOT for
decode), beside the instances registered now and the p90 latency measured by the routers
over the last ``window_s`` (``common.metrics``).

``cleave plan --redis-url URL`` (MoE models, no ``--expert-imbalance``) calls
:func:`read_expert_imbalance` on the decode leaders' expert counters
(``<prefix>experts:<model>:<layer>``, a HASH of expert id -> routed tokens, DESIGN §7).
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)

_LATENCY = {"prefill": ("ttft", "ttft_s"), "decode": ("tpot", "tpot_s")}


def plan_key(prefix: str) -> str:
    return f"{prefix}plan"


def summary(result: dict) -> dict:
    """The part of a plan the router shows: inputs and each pool's recommendation."""
    i = result["inputs"]
    out = {"model": i["model"], "hardware": i["hardware"], "gpus": i["gpus"], "written_at": time.time()}
    for pool, (_, field) in _LATENCY.items():
        r = result["recommendation"][pool]
        out[pool] = {"tp": r.get("tp"), "pp": r.get("pp"), "cp": r.get("cp"), "ep": r.get("ep"),
                     "instances": r.get("instances"), "capacity_rps": r.get("capacity_rps"),
                     "latency_s": r.get(field), "throughput_tok_s": r.get("throughput_tok_s")}
    return out


def publish(redis_url: str, prefix: str, result: dict) -> None:
    """Store :func:`summary` of ``result`` under ``<prefix>plan``; raises ValueError if Redis is unreachable."""
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(plan_key(prefix), json.dumps(summary(result)))
    except redis.RedisError as exc:
        raise ValueError(f"could not publish the plan to {redis_url}: {exc}") from None
    finally:
        client.close()


async def read_plan(client, prefix: str) -> dict:
    """The published plan (:func:`summary`) via an async Redis client; ``{}`` when there is none
    or Redis fails (logged)."""
    try:
        raw = await client.get(plan_key(prefix))
        return json.loads(raw) if raw else {}
    except Exception as exc:      # noqa: BLE001 - the plan is advisory: never fail the caller
        log.warning("could not read the published capacity plan: %s", exc)
        return {}


async def add_plan_inputs(decisions, client, prefix: str) -> None:
    """Add the plan's pool entry (layout, instances, predicted capacity per instance and
    latency) to each autoscaler decision's logged ``inputs`` under ``"plan"``."""
    plan = await read_plan(client, prefix)
    for d in decisions:
        if plan.get(d.pool):
            d.inputs["plan"] = plan[d.pool]


async def add_plan_view(info, client, prefix: str, window_s: float = 300.0) -> None:
    """Fill ``info.capacity`` / ``info.plan_summary`` from the published plan (async Redis
    client); nothing when no plan was published. Redis errors are logged, never raised."""
    from cleave.v1 import inference_pb2
    from common.metrics import percentile, read_latencies
    plan = await read_plan(client, prefix)
    if not plan:
        return
    try:
        registered = {p.pool: p.instances for p in info.pools}
        for pool, (kind, _) in _LATENCY.items():
            p = plan.get(pool) or {}
            measured = percentile(await read_latencies(client, prefix, kind, time.time() - window_s), 0.9)
            info.capacity.append(inference_pb2.PoolCapacity(
                pool=pool, planned_layout=inference_pb2.Layout(**{a: int(p.get(a) or 1) for a in ("tp", "pp", "cp", "ep")}),
                planned_instances=int(p.get("instances") or 0),
                predicted_capacity_rps=float(p.get("capacity_rps") or 0.0),
                predicted_latency_s=float(p.get("latency_s") or 0.0),
                instances=registered.get(pool, 0),
                measured_latency_p90_s=float(measured or 0.0)))
        info.plan_summary = f"{plan['model']} on {plan['gpus']} x {plan['hardware']}, planned " \
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(plan['written_at']))} UTC"
    except Exception as exc:      # noqa: BLE001 - a view for operators never fails GetModelInfo
        log.warning("could not read the published capacity plan: %s", exc)


def expert_imbalance(counts_by_layer: list[list[float]], ep: int) -> float:
    """Busiest EP rank's routed tokens over the mean, the worst layer, for ``ep`` ranks each
    holding a contiguous ``E/ep`` experts (``engine/moe.py``); 1.0 without counts."""
    worst = 1.0
    for counts in counts_by_layer:
        if not counts or sum(counts) <= 0 or len(counts) % ep:
            continue
        per = len(counts) // ep
        ranks = [sum(counts[r * per:(r + 1) * per]) for r in range(ep)]
        worst = max(worst, max(ranks) / (sum(ranks) / ep))
    return worst


def read_expert_imbalance(redis_url: str, prefix: str, model: str, ep: int = 0) -> float:
    """:func:`expert_imbalance` of the counters under ``<prefix>experts:<model>:*``; ``ep`` 0 = one
    rank per expert (the worst case any EP degree can see). 0.0 when there are none."""
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        layers = []
        for key in client.scan_iter(match=f"{prefix}experts:{model}:*"):
            h = {int(k): float(v) for k, v in client.hgetall(key).items() if k.isdigit()}
            if h:
                layers.append([h.get(e, 0.0) for e in range(max(h) + 1)])
    except redis.RedisError as exc:
        raise ValueError(f"could not read expert statistics from {redis_url}: {exc}") from None
    finally:
        client.close()
    if not layers:
        return 0.0
    return expert_imbalance(layers, ep or len(layers[0]))
