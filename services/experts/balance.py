"""Expert placement driven by the routing statistics in Redis: records, views, rebalancing.

Keys (beside DESIGN §7; the windowed buckets are described in ``services.experts.stats``):

- ``<prefix>placement:<model>`` — HASH, the pool's current expert placement: ``version``
  (int, +1 per change), ``num_experts``, ``ep``, ``slots`` (per EP rank), ``layers`` (JSON
  ``{layer: [logical expert of each physical slot]}``, see ``engine.expert_placement``), ``window_s`` (the
  statistics window it was computed over), ``interval_s`` (the writers' bucket length, so
  readers compute the bucket keys instead of scanning), ``updated`` (unix seconds), ``reason``,
  ``hotspot_before`` / ``hotspot_after`` (mean over layers of the predicted hotspot ratio).
  Written with a compare-and-set on ``version`` (WATCH/MULTI), so concurrent rebalancers
  publish one change per version. A decode instance starts from it (when its ``ep`` and slot
  count match) and follows every new version.
- ``<prefix>metrics:experts:<model>`` — HASH with a TTL, the load view decode instances
  publish every flush: ``<layer> -> hotspot ratio`` of the current placement over the window,
  and ``version``.

Who calls what: :class:`ExpertBalancer` runs in a decode instance's service process
(``services.decode``): :meth:`~ExpertBalancer.start` puts the recorded (or default) placement
on every rank before serving, :meth:`~ExpertBalancer.tick` (once a second) follows new versions
through the instance's command channel — so every rank switches at the same step boundary —
publishes the load view and, every ``rebalance_interval_s``, publishes a new placement when
the predicted hotspot ratio drops by more than ``rebalance_threshold``. ``cleave rebalance``
calls :func:`rebalance` on demand; the router's ``GetModelInfo`` calls :func:`load_view` (through
``services.router_views``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.expert_placement import Placement, default_placement, placements_from_json, placements_to_json
from services.experts.placement import balance
from services.experts.stats import read_window

log = logging.getLogger(__name__)


def placement_key(prefix: str, model_id: str) -> str:
    return f"{prefix}placement:{model_id}"


def view_key(prefix: str, model_id: str) -> str:
    return f"{prefix}metrics:experts:{model_id}"


@dataclass
class PlacementRecord:
    """One version of a pool's placement (the ``placement`` hash, decoded)."""

    version: int
    num_experts: int
    ep: int
    slots: int
    layers: dict[int, Placement]
    window_s: float = 300.0
    interval_s: int = 0                 # bucket length of the writers; 0 = unknown (readers SCAN)
    reason: str = ""
    hotspot_before: float = 0.0
    hotspot_after: float = 0.0
    updated: float = field(default_factory=time.time)

    def to_hash(self) -> dict[str, str]:
        return {"version": str(self.version), "num_experts": str(self.num_experts), "ep": str(self.ep),
                "slots": str(self.slots), "layers": placements_to_json(self.layers),
                "window_s": str(self.window_s), "interval_s": str(self.interval_s), "reason": self.reason,
                "updated": f"{self.updated:.3f}",
                "hotspot_before": f"{self.hotspot_before:.4f}", "hotspot_after": f"{self.hotspot_after:.4f}"}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "PlacementRecord":
        """ValueError on a malformed hash."""
        try:
            e, ep = int(h["num_experts"]), int(h["ep"])
            return cls(version=int(h["version"]), num_experts=e, ep=ep, slots=int(h["slots"]),
                       layers=placements_from_json(h["layers"], e, ep), window_s=float(h.get("window_s", 300)),
                       interval_s=int(h.get("interval_s", 0)), reason=h.get("reason", ""),
                       hotspot_before=float(h.get("hotspot_before", 0)),
                       hotspot_after=float(h.get("hotspot_after", 0)), updated=float(h.get("updated", 0)))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed placement record: {exc}") from None

    def matches(self, num_experts: int, ep: int, slots: int) -> bool:
        return (self.num_experts, self.ep, self.slots) == (num_experts, ep, slots)


def read_record(client, prefix: str, model_id: str) -> PlacementRecord | None:
    h = client.hgetall(placement_key(prefix, model_id))
    return PlacementRecord.from_hash(h) if h else None


def publish(client, prefix: str, model_id: str, record: PlacementRecord, expected_version: int) -> bool:
    """Write ``record`` if the stored version is still ``expected_version`` (0: no record yet).
    Returns False when someone else changed it first."""
    import redis

    key = placement_key(prefix, model_id)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)
            current = pipe.hget(key, "version")
            if int(current or 0) != expected_version:
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=record.to_hash())
            pipe.execute()
            return True
        except redis.WatchError:
            return False


def mean_hotspot(layers: dict[int, Placement], loads: dict[int, list[int]]) -> float:
    """Mean over the layers with load of the hotspot ratio (1.0 when none has load)."""
    ratios = [p.hotspot(loads[layer]) for layer, p in layers.items() if sum(loads.get(layer, ())) > 0]
    return sum(ratios) / len(ratios) if ratios else 1.0


def propose(record: PlacementRecord, loads: dict[int, list[int]]) -> tuple[dict[int, Placement], float, float]:
    """``(new layers, mean hotspot now, mean hotspot after)``: each layer with load in the
    window rebalanced with ``services.experts.placement.balance``; layers without load keep their placement."""
    new = {layer: balance(loads[layer], record.ep, record.slots) if sum(loads.get(layer, ())) > 0 else p
           for layer, p in record.layers.items()}
    return new, mean_hotspot(record.layers, loads), mean_hotspot(new, loads)


def rebalance(client, prefix: str, model_id: str, window_s: float | None = None, threshold: float = 0.0,
              dry_run: bool = False, reason: str = "cleave rebalance") -> dict:
    """Compute a placement from the window's loads and publish it as the next version when it
    lowers the mean predicted hotspot ratio by more than ``threshold`` (a fraction).
    Returns ``{"version", "published", "before", "after", "layers": {layer: (before, after)}}``.
    ValueError when the model has no placement record (no MoE decode instance has started)."""
    record = read_record(client, prefix, model_id)
    if record is None:
        raise ValueError(f"no expert placement recorded for model {model_id!r} under "
                         f"{placement_key(prefix, model_id)!r}: start a decode instance of an MoE model first")
    window = record.window_s if window_s is None else window_s
    loads = read_window(client, prefix, model_id, record.num_experts, window, interval_s=record.interval_s)
    new, before, after = propose(record, loads)
    per_layer = {layer: (record.layers[layer].hotspot(loads[layer]), new[layer].hotspot(loads[layer]))
                 for layer in sorted(record.layers) if sum(loads.get(layer, ())) > 0}
    published = False
    if not dry_run and after < before * (1.0 - threshold) and new != record.layers:
        nxt = PlacementRecord(record.version + 1, record.num_experts, record.ep, record.slots, new,
                              window_s=record.window_s, interval_s=record.interval_s, reason=reason,
                              hotspot_before=before, hotspot_after=after)
        published = publish(client, prefix, model_id, nxt, record.version)
    version = record.version + 1 if published else record.version
    return {"version": version, "published": published, "before": before, "after": after, "layers": per_layer}


def load_view(client, prefix: str, model_id: str, window_s: float | None = None) -> dict | None:
    """Per-layer load of the current placement over the window, or None without a record:
    ``{"version", "ep", "slots", "window_s", "layers": {layer: {"hotspot", "experts" [E],
    "ranks" [ep] tokens}}}``."""
    record = read_record(client, prefix, model_id)
    if record is None:
        return None
    window = record.window_s if window_s is None else window_s
    loads = read_window(client, prefix, model_id, record.num_experts, window, interval_s=record.interval_s)
    layers = {}
    for layer, p in sorted(record.layers.items()):
        experts = loads.get(layer, [0] * record.num_experts)
        layers[layer] = {"hotspot": p.hotspot(experts), "experts": experts, "ranks": p.rank_loads(experts)}
    return {"version": record.version, "ep": record.ep, "slots": record.slots, "window_s": window,
            "layers": layers}


class ExpertBalancer:
    """The placement side of one decode instance (see the module docstring).

    ``apply(layers)`` ({layer: Placement} -> summary dict) is the instance's switch
    (``Instance.apply_placement``); ``client`` a sync Redis client or None (no Redis: the
    default placement with the redundant slots, version 0, never changed)."""

    def __init__(self, client, prefix: str, model_id: str, num_experts: int, num_layers_moe: list[int],
                 ep: int, redundant: int, apply, window_s: float = 300.0, rebalance_interval_s: float = 0.0,
                 rebalance_threshold: float = 0.1, clock=time.time, interval_s: int = 0) -> None:
        if rebalance_interval_s < 0 or not 0 <= rebalance_threshold < 1:
            raise ValueError(f"need rebalance_interval_s >= 0 and 0 <= rebalance_threshold < 1, got "
                             f"{rebalance_interval_s} and {rebalance_threshold}")
        self.client, self.prefix, self.model_id, self.apply = client, prefix, model_id, apply
        self.num_experts, self.layers, self.ep = num_experts, list(num_layers_moe), ep
        self.slots = default_placement(num_experts, ep, redundant).slots
        self.redundant, self.window_s, self.interval_s = redundant, window_s, interval_s
        self.rebalance_interval_s, self.rebalance_threshold, self.clock = rebalance_interval_s, rebalance_threshold, clock
        self.version = 0                 # the recorded version in force here (0: none)
        self.current: dict[int, Placement] | None = None   # the tables in force
        self.hotspots: dict[int, float] = {}                # layer -> ratio over the window (metric)
        self.follow = client is not None
        self._last_rebalance = clock()
        self.switches: list[dict] = []   # summaries of the switches done here

    def _default(self, version: int = 1) -> PlacementRecord:
        p = default_placement(self.num_experts, self.ep, self.redundant)
        return PlacementRecord(version, self.num_experts, self.ep, self.slots, {layer: p for layer in self.layers},
                               window_s=self.window_s, interval_s=self.interval_s, reason="default")

    def start(self) -> None:
        """Before serving: the recorded placement when it fits this instance, else the default
        (recorded as version 1 when there is none)."""
        record = None
        if self.client is not None:
            try:
                record = read_record(self.client, self.prefix, self.model_id)
                if record is None:
                    publish(self.client, self.prefix, self.model_id, self._default(), 0)
                    record = read_record(self.client, self.prefix, self.model_id)
            except Exception as exc:
                log.warning("reading the expert placement from Redis failed (%s): using the default", exc)
                record = None
        if record is not None and not record.matches(self.num_experts, self.ep, self.slots):
            log.warning("the recorded expert placement is for ep=%d x %d slots, this instance has ep=%d x %d: "
                        "using the default placement and not following the pool's", record.ep, record.slots,
                        self.ep, self.slots)
            record, self.follow = None, False
        self._switch(record or self._default(version=0), "start")   # 0: not the pool's record

    def _switch(self, record: PlacementRecord, why: str) -> None:
        started = time.perf_counter()
        summary = self.apply(record.layers)
        summary = {**summary, "version": record.version, "why": why, "seconds": time.perf_counter() - started}
        self.switches.append(summary)
        self.version, self.current = record.version, record.layers
        log.info("expert placement version %d in force (%s): %d transfers, %.3f s", record.version, why,
                 summary.get("moved", 0), summary["seconds"])

    def tick(self) -> None:
        """Follow a newer recorded version; publish the load view; maybe rebalance."""
        if not self.follow:
            return
        record = read_record(self.client, self.prefix, self.model_id)
        if record is None or not record.matches(self.num_experts, self.ep, self.slots):
            return
        loads = read_window(self.client, self.prefix, self.model_id, self.num_experts, self.window_s,
                            interval_s=self.interval_s)
        if self.rebalance_interval_s and self.clock() - self._last_rebalance >= self.rebalance_interval_s:
            self._last_rebalance = self.clock()
            new, before, after = propose(record, loads)
            if after < before * (1.0 - self.rebalance_threshold) and new != record.layers:
                nxt = PlacementRecord(record.version + 1, self.num_experts, self.ep, self.slots, new,
                                      window_s=self.window_s, interval_s=self.interval_s, reason="periodic",
                                      hotspot_before=before,
                                      hotspot_after=after)
                if publish(self.client, self.prefix, self.model_id, nxt, record.version):
                    log.info("published expert placement version %d: mean hotspot %.3f -> %.3f",
                             nxt.version, before, after)
                record = read_record(self.client, self.prefix, self.model_id) or record
        if record.version != self.version:
            self._switch(record, "recorded version changed")
        self.hotspots = {layer: p.hotspot(loads.get(layer, [0] * self.num_experts))
                         for layer, p in record.layers.items()}
        key = view_key(self.prefix, self.model_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={**{str(k): f"{v:.4f}" for k, v in self.hotspots.items()},
                                "version": str(record.version)})
        pipe.expire(key, max(60, int(self.window_s)))
        pipe.execute()


def recorded_models(client, prefix: str) -> list[str]:
    """Model ids with a placement record."""
    head = placement_key(prefix, "")
    return sorted(k[len(head):] for k in client.scan_iter(match=placement_key(prefix, "*"), count=500))


def rebalance_cli(args) -> int:
    """``cleave rebalance``: one table line per layer, then what was published. ValueError
    (printed as one line by the CLI) when Redis is unreachable or nothing is recorded."""
    import redis

    from common.registry import connect_redis

    client = connect_redis(args.redis_url, asynchronous=False)
    try:
        models = [args.model_id] if args.model_id else recorded_models(client, args.key_prefix)
        if len(models) != 1:
            raise ValueError(f"pass --model-id, one of {models}" if models else
                             "no expert placement is recorded: start a decode instance of an MoE model first")
        out = rebalance(client, args.key_prefix, models[0], args.window, args.threshold, args.dry_run)
    except redis.RedisError as exc:
        raise ValueError(f"Redis at {args.redis_url}: {exc}") from None
    finally:
        client.close()
    print(f"model {models[0]}: layer  hotspot now -> predicted")
    for layer, (before, after) in out["layers"].items():
        print(f"  {layer:5d}  {before:6.3f} -> {after:6.3f}")
    verdict = (f"published as version {out['version']}" if out["published"] else
               "not published (dry run)" if args.dry_run else
               f"not published (no gain beyond the threshold, or another rebalancer won); version {out['version']}")
    print(f"mean hotspot {out['before']:.3f} -> {out['after']:.3f}: {verdict}")
    return 0


async def add_expert_view(info, redis_url: str, prefix: str, model_id: str) -> None:
    """Fill the MoE fields (20-23) of a ``ModelInfo`` from :func:`load_view` (best effort: a
    Redis error leaves them empty). Runs the sync Redis reads off the event loop."""
    import asyncio

    from cleave.v1 import inference_pb2
    from services.experts.stats import stats_model_id
    from common.registry import connect_redis

    def read():
        client = connect_redis(redis_url, asynchronous=False)
        try:
            return load_view(client, prefix, stats_model_id(model_id))
        finally:
            client.close()

    try:
        view = await asyncio.to_thread(read)
    except Exception as exc:
        log.warning("reading the expert load view failed: %s", exc)
        return
    if view is None:
        return
    info.expert_placement_version, info.expert_slots_per_rank = view["version"], view["slots"]
    info.expert_window_s = view["window_s"]
    for layer, v in view["layers"].items():
        info.expert_layers.append(inference_pb2.ExpertLayerLoad(
            layer=layer, hotspot_ratio=v["hotspot"], expert_tokens=v["experts"], rank_tokens=v["ranks"]))
