"""The router's config, and the config fields every process shares, validated on construction.

``RouterConfig`` is read by the router; the worker's ``services.config.WorkerConfig`` (which
holds the engine's ``engine.runtime.config.RuntimeConfig``) and the local launcher's
``services.launcher.StackConfig`` reuse the shared fields below. Each field declares its
command-line flag (``common.flags.option``), so ``services.cli`` adds and reads flags from the
dataclasses and writes none by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.flags import option

POOLS = ("prefill", "decode")
MAX_TOP_LOGPROBS = 20  # most likely tokens per position a request may ask for (OpenAI's bound, chat)


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0 = pick a free one), got {port}")


def check_prefix(prefix: str) -> None:
    if not prefix or not prefix.endswith(":"):
        raise ValueError(f"Redis key prefix must be non-empty and end with ':', got {prefix!r}")


def model_option():
    """The model every process of a deployment serves."""
    return option("", help="model: empty for the embedded SmolLM2-135M-Instruct, a .gguf file or a Hugging "
                  "Face directory")


def host_option():
    return option("127.0.0.1", help="address to bind and advertise")


def key_prefix_option():
    return option("cleave:", help="prefix of the deployment's Redis keys (ends with ':')")


ROUTING_POLICIES = ("kv-aware", "least-load")   # router.policy.POLICIES implements each
# Uncached prompt tokens up to which a request prefills on its decode instance instead of
# through the prefill pool. 0: measured with bench/routing.py (README "Routing and conditional
# disaggregation", 2-core Xeon, SmolLM2 fp32), disaggregation had the best goodput and TPOT on
# both workloads; local prefill (128 or 512) only cut short prompts' TTFT in a mixed load, at
# about 40 % more TPOT. A TTFT-bound deployment with mixed prompt lengths may set 128.
LOCAL_PREFILL_MAX_TOKENS = 0
# Prompt tokens queued on the least-loaded prefill instance past which the pool counts as
# saturated and requests prefill on their decode instance instead.
PREFILL_SATURATED_TOKENS = 8192


@dataclass(frozen=True)
class RouterConfig:
    """The public front door."""

    model: str = model_option()
    host: str = host_option()
    port: int = option(50051, help="public gRPC port")
    http_port: int = option(8000, help="OpenAI-compatible HTTP API and Prometheus /metrics (0 = a free port)")
    redis_url: str = option("redis://127.0.0.1:6379/0", help="the deployment's Redis (worker registry, "
                            "request records)")
    key_prefix: str = key_prefix_option()
    request_ttl_s: int = 3600          # request hashes expire this long after a terminal state
    request_timeout_s: float = option(0.0, flag="--request-timeout", help="seconds: a deadline on every request "
                                      "(0 = none: only the client's own deadline, its leaving or max_tokens ends "
                                      "a request)")
    transfer_timeout_s: float = option(30.0, flag="--transfer-timeout", help="seconds a KV push may take once "
                                       "prefill is done")
    admission_wait_s: float = option(10.0, flag="--admission-wait", help="seconds a request waits for KV room "
                                     "before RESOURCE_EXHAUSTED")
    pool_wait_s: float = option(60.0, flag="--pool-wait", help="seconds a request waits for a worker while its "
                                "pool has none registered and reachable (a restart takes 10-20 s) before "
                                "UNAVAILABLE")
    worker_grace_s: float = option(30.0, flag="--worker-grace", help="seconds a worker may be absent from the "
                                   "registry (nothing in flight) before its channel is closed; a shorter gap "
                                   "only pauses new requests to it")
    max_queued: int = option(256, help="requests waiting for KV room before RESOURCE_EXHAUSTED")
    routing_policy: str = option("kv-aware", choices=ROUTING_POLICIES, help="how workers are chosen: kv-aware = "
                                 "by the work a request costs there (prompt tokens its prefix cache lacks, plus its "
                                 "load), from the KV events workers publish; least-load = by load alone")
    local_prefill_max_tokens: int = option(LOCAL_PREFILL_MAX_TOKENS, help="prefill a request on its decode "
                                           "instance (no KV handoff) when the prompt tokens that instance's cache "
                                           "lacks are at most this many; longer prompts go through the prefill pool "
                                           "unless it is empty or saturated (0 = only then: the default, "
                                           "measured best for goodput on CPU; see README)")
    stream_buffer: int = option(1024, help="responses a request may have waiting for a client that reads slower "
                                "than tokens are made; one more ends that request with RESOURCE_EXHAUSTED (its KV "
                                "freed, other requests untouched)")
    discovery_s: float = 0.5           # how often the worker registry is re-read
    max_attempts: int = 3              # prefill / decode attempts per request
    internal_token: str = field(default="", repr=False)  # sent to worker APIs (CLEAVE_INTERNAL_TOKEN)

    def __post_init__(self) -> None:
        check_port(self.port)
        check_port(self.http_port)
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port and port must differ, both are {self.port}")
        check_prefix(self.key_prefix)
        if self.stream_buffer < 1:
            raise ValueError(f"stream_buffer must be >= 1 response, got {self.stream_buffer}")
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
        if self.local_prefill_max_tokens < 0:
            raise ValueError(f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}")
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(f"routing_policy must be one of {ROUTING_POLICIES}, got {self.routing_policy!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
