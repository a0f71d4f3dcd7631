"""Config dataclasses of the deployable processes, validated on construction.

``WorkerConfig`` is read by the prefill and decode services, ``RouterConfig`` by the router,
``StackConfig`` by the local launcher (``cleave serve`` / ``make run``). The CLI
(``services.cli``) is the only place that builds them from flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.layout import ParallelConfig
from common.model import WEIGHTS_DTYPES

POOLS = ("prefill", "decode")
TRANSPORTS = ("ucx", "tcp", "fake")
MAX_TOP_LOGPROBS = 20  # most likely tokens per position a request may ask for (OpenAI's bound, chat)


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0 = pick a free one), got {port}")


def _check_prefix(prefix: str) -> None:
    if not prefix or not prefix.endswith(":"):
        raise ValueError(f"Redis key prefix must be non-empty and end with ':', got {prefix!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """One prefill or decode instance."""

    pool: str                          # "prefill" or "decode"
    model: str = ""                    # model spec: "" (default SmolLM2), a .gguf file or an HF directory
    host: str = "127.0.0.1"            # address the gRPC server binds and advertises
    port: int = 0                      # 0 = a free port
    metrics_port: int = 0              # Prometheus /metrics port; 0 = not served
    redis_url: str = ""                # where to register; "" = do not register (tests)
    key_prefix: str = "cleave:"
    worker_id: str = ""                # "" = "<pool>-<host>-<port>"
    dtype: str = "auto"                # auto = bfloat16 on CUDA, float32 on CPU
    weights_dtype: str = "fp32"        # --weights-dtype: fp32 (exact) | bf16 | int8 | int4 (engine.quant)
    device: str = "auto"               # auto | cuda | cpu (engine.runtime.device)
    cuda_graphs: bool = True           # decode steps from CUDA graphs (CUDA only)
    block_size: int = 16
    num_blocks: int = 0                # 0 = derive from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    transport: str = "ucx"             # KV transport: ucx, tcp or fake
    checksum: bool = True              # CRC32 on every KV message
    max_batch: int = 64                # decode: running sequences per step
    threads: int = 0                   # torch intra-op threads per rank; 0 = one per core given (else torch's default)
    cpus: tuple = ()                   # cores for this instance's ranks on this host; () = unpinned
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0                 # registry record expires this long after the last beat
    reservation_grace_s: float = 10.0  # decode: unused reservations freed this long past their deadline
    max_reservation_s: float = 900.0   # decode: a reservation never lives longer than this
    max_reservations_per_caller: int = 512  # decode: reservations not yet decoding, per calling host
    drain_timeout_s: float = 60.0      # on SIGTERM, wait this long for running requests to finish
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # MoE decode: expert load balancing (services.expert_balance)
    redundant_experts: int = 0         # extra expert slots over the EP group, for copies of hot experts
    expert_stats_interval_s: int = 10  # length of one windowed-statistics bucket in Redis
    expert_window_s: float = 300.0     # statistics window the load view and the rebalancer use
    rebalance_interval_s: float = 0.0  # 0 = never rebalance on its own; else check this often
    rebalance_threshold: float = 0.1   # publish when the predicted hotspot ratio drops by more than this fraction
    internal_token: str = field(default="", repr=False)  # required from callers (CLEAVE_INTERNAL_TOKEN)
    # where the instance's ranks meet: an engine.runtime.config.Rendezvous; None = every rank
    # spawned on this host, rendezvous on a free port of --host
    rendezvous: Any = None

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        _check_port(self.port)
        _check_port(self.metrics_port)
        _check_prefix(self.key_prefix)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {self.weights_dtype!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got heartbeat_s={self.heartbeat_s} "
                             f"ttl_s={self.ttl_s}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not 0 < self.max_reservation_s < float("inf") or self.max_reservations_per_caller < 1:
            raise ValueError(f"need 0 < max_reservation_s < inf and max_reservations_per_caller >= 1, got "
                             f"{self.max_reservation_s} and {self.max_reservations_per_caller}")
        if self.pool == "prefill" and (self.parallel.pp > 1 or self.parallel.ep > 1):
            raise ValueError(f"a prefill instance is laid out tp x cp; got pp={self.parallel.pp} "
                             f"ep={self.parallel.ep}")
        if self.redundant_experts < 0 or self.expert_stats_interval_s < 1 \
                or self.expert_window_s < self.expert_stats_interval_s:
            raise ValueError(f"need redundant_experts >= 0, expert_stats_interval_s >= 1 and "
                             f"expert_window_s >= expert_stats_interval_s, got {self.redundant_experts}, "
                             f"{self.expert_stats_interval_s} and {self.expert_window_s}")
        if self.rebalance_interval_s < 0 or not 0 <= self.rebalance_threshold < 1:
            raise ValueError(f"need rebalance_interval_s >= 0 and 0 <= rebalance_threshold < 1, got "
                             f"{self.rebalance_interval_s} and {self.rebalance_threshold}")
        if self.pool == "decode" and self.parallel.cp > 1:
            raise ValueError(f"a decode instance is laid out tp x pp x ep; got cp={self.parallel.cp}")


@dataclass(frozen=True)
class RouterConfig:
    """The public front door."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000              # OpenAI-compatible API and /metrics; 0 = a free port
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "cleave:"
    request_ttl_s: int = 3600          # request hashes expire this long after a terminal state
    # a deadline the operator puts on every request (0 = none: a request without a client
    # deadline runs until it finishes, its client leaves or it reaches max_tokens)
    request_timeout_s: float = 0.0
    transfer_timeout_s: float = 30.0   # a KV push must finish within this once prefill is done
    admission_wait_s: float = 10.0     # wait this long for KV room before RESOURCE_EXHAUSTED
    pool_wait_s: float = 60.0          # wait this long for a worker while a pool has none routable
                                       # (a restart takes 10-20 s) before UNAVAILABLE
    worker_grace_s: float = 30.0       # a worker absent from the registry this long (nothing in
                                       # flight) is gone: its channel is closed
    max_queued: int = 256              # requests waiting for KV room before RESOURCE_EXHAUSTED
    discovery_s: float = 0.5           # how often the worker registry is re-read
    max_attempts: int = 3              # prefill / decode attempts per request
    internal_token: str = field(default="", repr=False)  # sent to worker APIs (CLEAVE_INTERNAL_TOKEN)

    def __post_init__(self) -> None:
        _check_port(self.port)
        _check_port(self.http_port)
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port and port must differ, both are {self.port}")
        _check_prefix(self.key_prefix)
        if not self.redis_url:
            raise ValueError("the router needs a Redis URL (e.g. redis://127.0.0.1:6379/0)")
        for name in ("transfer_timeout_s", "discovery_s", "pool_wait_s", "worker_grace_s"):
            if not 0 < getattr(self, name) < float("inf"):  # NaN fails every comparison
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.request_timeout_s < float("inf"):
            raise ValueError(f"request_timeout_s must be a finite number >= 0 (0 = none), got {self.request_timeout_s}")
        if not 0 <= self.admission_wait_s < float("inf") or self.max_queued < 0:
            raise ValueError(f"admission_wait_s and max_queued must be >= 0, got "
                             f"{self.admission_wait_s} and {self.max_queued}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
