"""The planner: sizes the prefill and decode pools independently from their load in Redis.

Lifecycle (one planner per deployment; ``cleave planner`` or ``cleave serve --planner``):

1. Every ``interval_s``, :func:`collect_loads` reads each pool's load from Redis: worker
   records (``common.registry``: queued prefill tokens, free KV blocks, running sequences,
   draining flags) and the routers' metrics (``common.metrics``: TTFT and TPOT samples of
   the last ``window_s``, requests waiting for decode KV room).
2. :func:`decide` — a pure function of config, loads, current replica counts, the planner's
   memory (:class:`PlannerState`) and the time — returns one :class:`Decision` per pool.
3. :class:`Planner` logs every decision with its inputs and calls ``backend.scale`` for the
   pools whose count changes (``services.scaling``: local processes or Kubernetes).

The signals (DESIGN §6):

- **prefill** is over target when its queued prompt tokens per instance exceed
  ``queue_target_tokens`` or the TTFT p90 exceeds ``ttft_target_s``. TTFT is ignored while
  requests wait for decode KV room: then the first token is late because of decode.
- **decode** is over target when KV-block utilisation exceeds ``kv_high``, the TPOT p90
  exceeds ``tpot_target_s``, or requests wait for KV room.

Hysteresis: a pool grows (by ``ceil(current × pressure)``, at most ``max_step`` at once) only
when ``cooldown_up_s`` passed since its last change and every instance it already asked for
has registered; it shrinks by one only when it would still be under the low watermarks
(``low_fraction`` of the targets, ``kv_low``) without that instance, and has been so for
``cooldown_down_s`` since it was last busy or changed. Bounds are enforced at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

from common.config import POOLS
from common.metrics import percentile, read_latencies, read_waiting_for_kv
from common.registry import connect_redis, read_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner aims for; every field is a flag of ``cleave planner``."""

    interval_s: float = 2.0            # one decision round every this many seconds
    window_s: float = 30.0             # TTFT/TPOT samples of this recent past count
    prefill_min: int = 1
    prefill_max: int = 4
    decode_min: int = 1
    decode_max: int = 4
    ttft_target_s: float = 2.0         # prefill: p90 time to first token
    queue_target_tokens: int = 4096    # prefill: queued prompt tokens per instance
    tpot_target_s: float = 0.5         # decode: p90 time per output token
    kv_high: float = 0.8               # decode: grow above this KV-block utilisation
    kv_low: float = 0.3                # decode: may shrink when the rest would stay below this
    low_fraction: float = 0.5          # shrink only when latencies/queues are below this share of target
    cooldown_up_s: float = 10.0        # at least this long between two changes when growing
    cooldown_down_s: float = 60.0      # idle (and unchanged) this long before shrinking
    max_step: int = 2                  # instances added to a pool in one decision at most

    def __post_init__(self) -> None:
        for pool in POOLS:
            lo, hi = self.bounds(pool)
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"{pool} bounds need 0 <= min <= max and max >= 1, got min={lo} max={hi}")
        for name in ("interval_s", "window_s", "ttft_target_s", "tpot_target_s", "queue_target_tokens"):
            if not 0 < getattr(self, name) < float("inf"):  # NaN fails every comparison
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.kv_low < self.kv_high <= 1:
            raise ValueError(f"need 0 <= kv_low < kv_high <= 1, got kv_low={self.kv_low} kv_high={self.kv_high}")
        if not 0 < self.low_fraction < 1:
            raise ValueError(f"low_fraction must be in (0, 1), got {self.low_fraction}")
        if not (0 <= self.cooldown_up_s < float("inf") and 0 <= self.cooldown_down_s < float("inf")):
            raise ValueError(f"cooldowns must be >= 0, got up={self.cooldown_up_s} down={self.cooldown_down_s}")
        if self.max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {self.max_step}")

    def bounds(self, pool: str) -> tuple[int, int]:
        return getattr(self, f"{pool}_min"), getattr(self, f"{pool}_max")


@dataclass(frozen=True)
class PoolLoad:
    """One pool's load at one moment, as :func:`collect_loads` reads it."""

    pool: str
    instances: int = 0                 # registered instances taking work (not draining)
    queued_tokens: int = 0             # prefill: prompt tokens queued or in prefill, pool total
    kv_utilization: float = 0.0        # decode: used / total KV blocks over the pool
    running: int = 0                   # sequences (decode) or prompts (prefill) in progress
    waiting_for_kv: int = 0            # requests the routers hold until decode has KV room
    latency_p90: float | None = None   # prefill: TTFT; decode: TPOT (seconds); None = no samples


@dataclass(frozen=True)
class Decision:
    pool: str
    current: int
    desired: int
    reason: str
    inputs: dict = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass(frozen=True)
class PlannerState:
    """What the planner remembers between rounds: when each pool last changed or was busy."""

    last_change: dict = field(default_factory=dict)   # pool -> unix time
    last_busy: dict = field(default_factory=dict)     # pool -> unix time


def _pressure(cfg: PlannerConfig, load: PoolLoad, current: int) -> tuple[float, bool, str]:
    """(pressure, idle, why): pressure > 1 means over target; idle means one instance fewer
    would still be under the low watermarks."""
    n, fewer = max(current, 1), max(current - 1, 1)
    low = cfg.low_fraction
    if load.pool == "prefill":
        queue = load.queued_tokens / n / cfg.queue_target_tokens
        ttft = 0.0 if load.latency_p90 is None or load.waiting_for_kv else load.latency_p90 / cfg.ttft_target_s
        idle = load.queued_tokens / fewer < low * cfg.queue_target_tokens and ttft < low
        why = f"queue {queue:.2f}x target, TTFT p90 {ttft:.2f}x target"
        return max(queue, ttft), idle, why
    kv = load.kv_utilization / cfg.kv_high
    tpot = 0.0 if load.latency_p90 is None else load.latency_p90 / cfg.tpot_target_s
    waiting = 1.5 if load.waiting_for_kv else 0.0
    idle = (load.kv_utilization * n / fewer < cfg.kv_low and tpot < low and not load.waiting_for_kv)
    why = (f"KV {load.kv_utilization:.0%} ({kv:.2f}x high watermark), TPOT p90 {tpot:.2f}x target, "
           f"{load.waiting_for_kv} waiting for KV")
    return max(kv, tpot, waiting), idle, why


def _decide_pool(cfg: PlannerConfig, load: PoolLoad, current: int, state: PlannerState,
                 now: float) -> tuple[Decision, bool]:
    """One pool's decision and whether the pool counts as busy now."""
    pool = load.pool
    lo, hi = cfg.bounds(pool)
    pressure, idle, why = _pressure(cfg, load, current)
    inputs = dict(asdict(load), pressure=round(pressure, 3), idle=idle)
    hold = lambda reason: Decision(pool, current, current, reason, inputs)  # noqa: E731
    if current < lo or current > hi:
        target = min(max(current, lo), hi)
        return Decision(pool, current, target, f"outside the bounds [{lo}, {hi}]", inputs), not idle
    since_change = now - state.last_change.get(pool, -math.inf)
    if pressure > 1:
        if current >= hi:
            return hold(f"over target ({why}) but at the maximum {hi}"), True
        if load.instances < current:
            return hold(f"over target ({why}); waiting for {current - load.instances} starting "
                        f"instance(s) to register"), True
        if since_change < cfg.cooldown_up_s:
            return hold(f"over target ({why}); cooling down ({since_change:.0f}/{cfg.cooldown_up_s:.0f} s)"), True
        target = min(hi, current + cfg.max_step, max(current + 1, math.ceil(current * pressure)))
        return Decision(pool, current, target, f"over target: {why}", inputs), True
    if not idle:
        return hold(f"within target ({why})"), True
    if current <= lo:
        return hold(f"idle ({why}) at the minimum {lo}"), False
    quiet = min(now - state.last_busy.get(pool, now), since_change)
    if quiet < cfg.cooldown_down_s:
        return hold(f"idle ({why}) for {quiet:.0f}/{cfg.cooldown_down_s:.0f} s"), False
    return Decision(pool, current, current - 1, f"idle for {quiet:.0f} s: {why}", inputs), False


def decide(cfg: PlannerConfig, loads: dict[str, PoolLoad], replicas: dict[str, int],
           state: PlannerState, now: float) -> tuple[list[Decision], PlannerState]:
    """One decision per pool, and the planner's state after them. Pure: no I/O, no clock."""
    last_change, last_busy = dict(state.last_change), dict(state.last_busy)
    for pool in POOLS:
        last_busy.setdefault(pool, now)  # a planner that just started waits a full cooldown to shrink
    state = replace(state, last_busy=last_busy)
    decisions = []
    for pool in POOLS:
        decision, busy = _decide_pool(cfg, loads.get(pool, PoolLoad(pool)), replicas[pool], state, now)
        decisions.append(decision)
        if busy:
            last_busy[pool] = now
        if decision.changes:
            last_change[pool] = now
    return decisions, PlannerState(last_change=last_change, last_busy=last_busy)


async def collect_loads(client, prefix: str, window_s: float, now: float | None = None) -> dict[str, PoolLoad]:
    """Each pool's load from Redis (an async client with decoded responses)."""
    now = time.time() if now is None else now
    workers = await read_workers(client, prefix)
    waiting = await read_waiting_for_kv(client, prefix)
    loads = {}
    for pool, kind in (("prefill", "ttft"), ("decode", "tpot")):
        members = [w for w in workers if w.pool == pool]
        serving = [w for w in members if not w.draining]
        total = sum(w.capacity.get("total_blocks", 0) for w in serving)
        free = sum(w.load.get("free_blocks", 0) for w in serving)
        samples = await read_latencies(client, prefix, kind, now - window_s)
        loads[pool] = PoolLoad(
            pool=pool, instances=len(serving),
            queued_tokens=sum(w.load.get("queued_tokens", 0) for w in members),
            kv_utilization=(total - free) / total if total else 0.0,
            running=sum(w.load.get("running", 0) for w in members),
            waiting_for_kv=waiting, latency_p90=percentile(samples, 0.9))
    return loads


class Planner:
    """Runs :func:`decide` every ``cfg.interval_s`` against a scaling backend.

    Built by ``cleave planner`` (Kubernetes) and by ``services.scaling_local.PlannerThread``
    (``cleave serve --planner``); :meth:`run` owns the Redis client and closes the backend."""

    def __init__(self, cfg: PlannerConfig, backend, redis_url: str, prefix: str) -> None:
        self.cfg = cfg
        self.backend = backend              # services.scaling.ScalingBackend
        self.redis_url = redis_url
        self.prefix = prefix
        self.state = PlannerState()
        self.history: list[Decision] = []   # the decisions that changed a pool, oldest first

    async def tick(self, client, now: float | None = None) -> list[Decision]:
        """One round: read loads (``client``: async Redis), decide, log, scale. Returns every
        pool's decision."""
        now = time.time() if now is None else now
        loads = await collect_loads(client, self.prefix, self.cfg.window_s, now)
        replicas = {pool: await asyncio.to_thread(self.backend.replicas, pool) for pool in POOLS}
        decisions, self.state = decide(self.cfg, loads, replicas, self.state, now)
        from services.capacity.published import add_plan_inputs   # `cleave plan --publish`'s prediction
        await add_plan_inputs(decisions, client, self.prefix)
        for d in decisions:
            if not d.changes:
                log.debug("planner: %s stays at %d: %s | inputs %s", d.pool, d.current, d.reason, d.inputs)
                continue
            log.info("planner: %s %d -> %d: %s | inputs %s", d.pool, d.current, d.desired, d.reason, d.inputs)
            await asyncio.to_thread(self.backend.scale, d.pool, d.desired)
            self.history.append(d)
        return decisions

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set (a failed round is logged and the next one tried), then
        close the backend and the Redis client."""
        client = connect_redis(self.redis_url)
        try:
            while not stop.is_set():
                try:
                    await self.tick(client)
                except Exception as exc:
                    log.warning("planner round failed: %s", exc)
                try:
                    await asyncio.wait_for(stop.wait(), self.cfg.interval_s)
                except TimeoutError:
                    pass
        finally:
            self.backend.close()
            await client.aclose()
