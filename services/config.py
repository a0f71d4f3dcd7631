"""``WorkerConfig``: one prefill or decode instance, validated on construction.

It holds the engine's :class:`~engine.runtime.config.RuntimeConfig` (model, layout, device, KV
cache, transport, rendezvous) and adds what the service around it needs (gRPC and metrics
ports, Redis registration, reservations, draining, MoE expert balancing). Every field declares
its flag once (``common.flags.option``): ``cleave worker`` and ``cleave rank`` add them with
``add_arguments(WorkerConfig, parser)`` and read them with ``from_args``; the local launcher
passes a whole config as JSON (``--config-json``). Adding a worker flag is adding a field here
or in ``RuntimeConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import POOLS, check_port, check_prefix, key_prefix_option
from common.flags import option
from engine.runtime.config import RuntimeConfig


@dataclass(frozen=True)
class WorkerConfig:
    """One prefill or decode instance."""

    pool: str                          # "prefill" or "decode" (the command's positional argument)
    runtime: RuntimeConfig = option(default_factory=RuntimeConfig, nested=True, help="the instance's ranks")
    port: int = option(0, help="gRPC port (0 = a free port)")
    metrics_port: int = option(0, help="serve Prometheus /metrics on this port (0 = do not serve them)")
    redis_url: str = option("", help="Redis to register in (empty = do not register)")
    key_prefix: str = key_prefix_option()
    worker_id: str = option("", help="the instance's name in the registry (empty = <pool>-<host>-<port>)")
    heartbeat_s: float = 1.0
    ttl_s: float = option(5.0, flag="--registry-ttl", help="seconds the Redis record outlives the last heartbeat: "
                          "routers stop sending to an instance silent this long (must exceed the 1 s heartbeat)")
    kv_events: bool = option(True, help="publish the prefix cache's block stored/removed events and periodic "
                             "snapshots to Redis for KV-aware routers (<prefix>kv-events:<pool>; needs --redis-url)")
    kv_snapshot_interval_s: float = option(5.0, flag="--kv-snapshot-interval", help="seconds between snapshots of "
                                           "the blocks an instance caches, in Redis (<prefix>kv-snapshot:<pool>:<id>)")
    reservation_grace_s: float = 10.0  # decode: unused reservations freed this long past their deadline
    max_reservation_s: float = option(900.0, flag="--max-reservation", help="decode: seconds a KV reservation "
                                      "may live at most, whatever deadline the caller asks")
    max_reservations_per_caller: int = option(512, help="decode: reservations not yet decoding that one "
                                              "calling host may hold")
    kv_watermark: float = option(0.01, help="decode: share of the KV blocks a new reservation must leave "
                                 "available, so running sequences can grow without preempting at once")
    drain_timeout_s: float = option(60.0, flag="--drain-timeout", help="on SIGTERM, seconds to let running "
                                    "requests finish before exiting")
    # MoE decode: expert load balancing (services.experts)
    redundant_experts: int = option(0, help="MoE decode: extra expert slots over the EP group for copies of hot "
                                    "experts (ep must divide num_experts + this)")
    expert_stats_interval_s: int = option(10, flag="--expert-stats-interval", help="MoE decode: seconds per "
                                          "windowed expert-statistics bucket in Redis")
    expert_window_s: float = option(300.0, flag="--expert-window", help="MoE decode: seconds of expert "
                                    "statistics the load view and rebalancer use")
    rebalance_interval_s: float = option(0.0, flag="--rebalance-interval", help="MoE decode: seconds between "
                                         "automatic rebalancing checks (0 = only `cleave rebalance`)")
    rebalance_threshold: float = option(0.1, help="MoE decode: rebalance when the predicted hotspot ratio drops "
                                        "by more than this fraction")
    internal_token: str = field(default="", repr=False)  # required from callers (CLEAVE_INTERNAL_TOKEN)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        check_port(self.port)
        check_port(self.metrics_port)
        check_prefix(self.key_prefix)
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got heartbeat_s={self.heartbeat_s} "
                             f"ttl_s={self.ttl_s}")
        if not 0 < self.kv_snapshot_interval_s < float("inf"):
            raise ValueError(f"kv_snapshot_interval_s must be > 0, got {self.kv_snapshot_interval_s}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not 0 < self.max_reservation_s < float("inf") or self.max_reservations_per_caller < 1:
            raise ValueError(f"need 0 < max_reservation_s < inf and max_reservations_per_caller >= 1, got "
                             f"{self.max_reservation_s} and {self.max_reservations_per_caller}")
        if not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        parallel = self.runtime.parallel
        if self.pool == "prefill" and (parallel.pp > 1 or parallel.ep > 1):
            raise ValueError(f"a prefill instance is laid out tp x cp; got pp={parallel.pp} ep={parallel.ep}")
        if self.pool == "decode" and parallel.cp > 1:
            raise ValueError(f"a decode instance is laid out tp x pp x ep; got cp={parallel.cp}")
        if self.redundant_experts < 0 or self.expert_stats_interval_s < 1 \
                or self.expert_window_s < self.expert_stats_interval_s:
            raise ValueError(f"need redundant_experts >= 0, expert_stats_interval_s >= 1 and "
                             f"expert_window_s >= expert_stats_interval_s, got {self.redundant_experts}, "
                             f"{self.expert_stats_interval_s} and {self.expert_window_s}")
        if self.rebalance_interval_s < 0 or not 0 <= self.rebalance_threshold < 1:
            raise ValueError(f"need rebalance_interval_s >= 0 and 0 <= rebalance_threshold < 1, got "
                             f"{self.rebalance_interval_s} and {self.rebalance_threshold}")
