"""Expert load balancing on one MoE decode instance: the package's one hook into the engine.

Who calls what: the decode service (``services.decode``) builds one :class:`InstanceExperts`
for a MoE model and calls :meth:`~InstanceExperts.start` before serving, :meth:`~InstanceExperts.tick`
about once a second, :meth:`~InstanceExperts.load_info` for its ``ExpertLoad`` RPC and
:meth:`~InstanceExperts.stop` when it stops. Everything it needs from the engine goes through
the instance's executor: ``expert_counts()`` (cumulative routed pairs per expert, gathered from
the stage leaders), ``apply_placement(layers)`` and ``rank_pairs()``. Nothing in the engine
knows Redis, the statistics window or the balancer.

Each tick: the counts' increments go to Redis in one pipeline (``services.experts.stats``,
only when decode steps ran since the last tick), then the balancer follows the recorded
placement (a switch is one command of the instance's channel, so it lands between two steps on
every rank), publishes the load view and maybe rebalances (``services.experts.balance``).
Redis being down costs nothing but the statistics: counts are kept and sent with the next
flush, the placement in force stays.
"""
from __future__ import annotations

import logging

from cleave.v1 import worker_pb2
from common.registry import connect_redis
from services.experts.balance import ExpertBalancer
from services.experts.stats import ExpertStatsWriter, stats_model_id

log = logging.getLogger(__name__)


class InstanceExperts:
    """The statistics writer and the balancer of one instance (see the module docstring).
    ``executor``: the instance's ``engine.runtime.executor.Executor``; ``cfg``: its
    ``services.config.WorkerConfig``; ``model_id`` / ``model``: what it serves."""

    def __init__(self, executor, cfg, model_id: str, model) -> None:
        self.executor = executor
        client = connect_redis(cfg.redis_url, asynchronous=False) if cfg.redis_url else None
        name = stats_model_id(model_id)
        self.writer = ExpertStatsWriter(client, name, cfg.key_prefix, interval_s=cfg.expert_stats_interval_s,
                                        window_s=cfg.expert_window_s) if client is not None else None
        self.balancer = ExpertBalancer(client, cfg.key_prefix, name, model.num_experts, list(range(model.num_layers)),
                                       cfg.runtime.parallel.ep, cfg.redundant_experts, executor.apply_placement,
                                       window_s=cfg.expert_window_s, rebalance_interval_s=cfg.rebalance_interval_s,
                                       rebalance_threshold=cfg.rebalance_threshold,
                                       interval_s=cfg.expert_stats_interval_s)

    @property
    def hotspots(self) -> dict:
        """``{layer: hotspot ratio}`` of the placement in force over the window (``/metrics``)."""
        return self.balancer.hotspots

    def start(self) -> None:
        """Put the pool's recorded placement (or the default) on every rank before serving."""
        self.balancer.start()

    def flush(self) -> int:
        """Send the routed-pair increments since the last flush; returns the fields written
        (0 without Redis, or when Redis refused: then the next flush sends them)."""
        if self.writer is None:
            return 0
        counts = self.executor.expert_counts()
        try:
            return self.writer.flush(counts)
        except Exception as exc:  # Redis down: the counts are kept and retried on the next flush
            log.warning("writing expert counts failed: %s", exc)
            return 0

    def tick(self, stepped: bool) -> None:
        """One beat (blocking; run it off the event loop): flush when decode steps ran, then
        follow, publish and maybe rebalance."""
        if stepped:
            self.flush()
        try:
            self.balancer.tick()
        except Exception as exc:  # Redis down or a bad record: keep serving the placement in force
            log.warning("expert placement update failed: %s", exc)

    def stop(self) -> None:
        self.flush()

    def load_info(self) -> worker_pb2.ExpertLoadInfo:
        """The placement in force, per-rank computed pairs and the switches made here."""
        pairs, b = self.executor.rank_pairs(), self.balancer
        tables = b.current or {}
        return worker_pb2.ExpertLoadInfo(
            placement_version=b.version, ep=b.ep, slots_per_rank=b.slots,
            layers=[worker_pb2.ExpertLayerSlots(layer=layer, rank_pairs=n,
                                                slot_experts=list(tables[layer].phys_to_log) if layer in tables else [])
                    for layer, n in sorted(pairs.items())],
            switches=[worker_pb2.PlacementSwitch(version=s["version"], seconds=s["seconds"],
                                                 transfers=s.get("moved", 0), bytes=s.get("bytes", 0))
                      for s in b.switches])
