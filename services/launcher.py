"""The local stack behind ``make run`` / ``cleave serve``: Redis, workers and router as processes.

Lifecycle:

1. Start a private ``redis-server`` on a free port (unless a Redis URL is given).
2. Start the prefill and decode instances (``cleave worker POOL --config-json ...``: the
   pool's ``WorkerConfig`` template with the stack's model, host, Redis and cores; free gRPC
   ports, registering in Redis, each serving Prometheus ``/metrics`` on a free port:
   ``metrics_ports``) and the router (its ``RouterConfig`` likewise) on the requested ports
   (gRPC on ``port``, the OpenAI API and ``/metrics`` on ``http_port``).
3. Wait until the router's gRPC health check says SERVING (a worker of each pool is
   registered), then print one line saying where it listens.
4. With a planner (``cleave serve --planner``: ``services.serve.run_stack``), a thread runs
   ``services.planner`` against :class:`services.scaling_local.LocalBackend`, which adds workers
   through :meth:`LocalStack.add_worker` and retires them through :meth:`LocalStack.retire_worker`
   (SIGTERM: the worker drains, then exits; a retired worker exiting is not a failure).
5. Supervise (:meth:`LocalStack.supervise`, every 0.2 s): a worker that dies unasked is logged
   and restarted with exponential backoff (1 s doubling to 30 s; reset once it has run for a
   minute) while its pool keeps serving on the survivors; a private Redis that dies is restarted
   on its port. The stack ends only when the router dies, or when a pool has no live instance
   and its last ``max_restarts`` restarts each died before a minute was up (a crash loop).
6. On SIGINT/SIGTERM, or a fatal death (5.), stop every child (SIGTERM, then SIGKILL after a
   grace period) and the private Redis. Children also get SIGTERM if this process dies
   (``PR_SET_PDEATHSIG``, set by ``services.parent_guard``), so nothing is left behind.

Secrets never travel in argv: the internal-API token (``CLEAVE_INTERNAL_TOKEN``, made per run
when unset) and a Redis password (``CLEAVE_REDIS_PASSWORD``, or taken out of ``redis_url``)
reach the children through their environment, and printed URLs are masked.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave.v1 import inference_pb2, inference_pb2_grpc
from common.config import RouterConfig, host_option, model_option
from common.environment import Environment
from common.flags import option, replace, to_json
from common.registry import split_password
from engine.parallel import free_port
from engine.runtime.cores import available, format_cpus, parse_cpus, split
from services.config import WorkerConfig

log = logging.getLogger(__name__)


def _templates(pool: str):
    return lambda: WorkerConfig(pool=pool)


@dataclass(frozen=True)
class StackConfig:
    """One local deployment. ``prefill``, ``decode`` and ``router`` are the configs every
    instance of that part starts from; the stack sets in each what is the stack's own (model,
    host, Redis URL, ports, cores) and hands it over as JSON (``--config-json``)."""

    port: int = option(50051, help="router's gRPC port")
    # None = 8000, or a free port when ``port`` is 0 (tests); ``cleave serve``'s flag defaults to 8000
    http_port: int | None = option(None, help="router's OpenAI-compatible HTTP API and /metrics (0 = a free port)")
    host: str = host_option()
    redis_url: str = option("", help="use this Redis instead of a private one")
    model: str = model_option()
    prefill_instances: int = option(1, help="prefill instances to start (0 = aggregated serving: decode "
                                    "instances prefill every prompt themselves)")
    decode_instances: int = option(1, help="decode instances to start")
    prefill: WorkerConfig = field(default_factory=_templates("prefill"))
    decode: WorkerConfig = field(default_factory=_templates("decode"))
    router: RouterConfig = field(default_factory=RouterConfig)
    ready_timeout_s: float = option(300.0, flag="--ready-timeout", help="seconds to wait for the stack to serve")
    log_level: str = "INFO"
    extra_env: dict = field(default_factory=dict)
    planner: object = None               # a services.planner.PlannerConfig: run the planner too
    max_restarts: int = 3                # a pool with no live instance ends the stack after this
                                         # many restarts in a row that died within a minute
    cpus: tuple[int, ...] = option((), to_field=parse_cpus, from_field=format_cpus,
                                   help="cores the stack may use, e.g. 0-7 (default: all this process may use); "
                                        "split between the workers in proportion to their ranks, with a spare "
                                        "core for the router when there is one")
    pin_cores: bool = option(True, help="give each worker its own cores (--no-pin-cores: let them share every "
                             "core)")

    def __post_init__(self) -> None:
        if self.http_port is None:  # a stack on a free gRPC port (tests) takes a free HTTP port too
            object.__setattr__(self, "http_port", 0 if self.port == 0 else 8000)
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.http_port <= 65535 or (self.http_port and self.http_port == self.port):
            raise ValueError(f"http_port must be in 0..65535 and differ from port, got {self.http_port} "
                             f"(port {self.port})")
        if self.prefill_instances < 0 or self.decode_instances < 1:
            raise ValueError(f"need prefill >= 0 and decode >= 1 instances, got prefill={self.prefill_instances} "
                             f"decode={self.decode_instances}")
        if (self.prefill.pool, self.decode.pool) != ("prefill", "decode"):
            raise ValueError(f"the prefill and decode templates are for pools 'prefill' and 'decode', got "
                             f"{self.prefill.pool!r} and {self.decode.pool!r}")


# the worker fields ``cleave serve`` offers as its own flags: for every instance, and for decode ones
SERVE_WORKER_FIELDS = ("transport", "kv_cache_bytes", "threads", "weights_dtype", "max_batch", "fake_engine")
SERVE_DECODE_FIELDS = ("redundant_experts", "expert_stats_interval_s", "expert_window_s",
                       "rebalance_interval_s", "rebalance_threshold")


def workers(prefill: dict | None = None, decode: dict | None = None, **both) -> dict[str, WorkerConfig]:
    """``StackConfig``'s ``prefill`` and ``decode`` templates from fields by their flat names
    (``common.flags.replace``): ``both`` for every instance, ``prefill``/``decode`` per pool, e.g.
    ``StackConfig(**workers(transport="tcp", num_blocks=64, decode={"tp": 2}))``."""
    return {pool: replace(WorkerConfig(pool=pool), **both, **(extra or {}))
            for pool, extra in (("prefill", prefill), ("decode", decode))}


class LocalStack:
    """Starts and stops the processes of one local deployment. Used by the CLI and by tests."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.procs: list[tuple[str, subprocess.Popen]] = []
        env = Environment.read()
        # secrets reach the children through their environment, never their argv
        self.redis_url, password = split_password(cfg.redis_url)
        self.redis_password = password or env.redis_password
        self.token = env.internal_token or secrets.token_urlsafe(24)
        self.router_port = cfg.port
        self.http_port = cfg.http_port
        self.metrics_ports: dict[str, int] = {}  # worker name -> its Prometheus /metrics port
        self.ready: dict[str, int] = {}          # pool -> instances registered when start() returned
        self._lock = threading.Lock()        # the planner's thread adds and retires workers
        self._retiring: set[str] = set()     # names of workers asked to drain and exit
        self._count = {"prefill": 0, "decode": 0}
        self._argv: dict[str, tuple[list[str], bool]] = {}  # name -> (argv, quiet), for restarts
        self._restart: dict[str, tuple[float, float]] = {}  # dead name -> (restart at, backoff)
        self._crashes: dict[str, int] = {"prefill": 0, "decode": 0}  # quick deaths in a row
        self._started: dict[str, float] = {}
        self.cores: dict[str, tuple[int, ...]] = {}    # name -> cores it was given (see plan_cores)
        self._pool_cores: dict[str, tuple[int, ...]] = {}

    def _spawn(self, name: str, argv: list[str], quiet: bool = False) -> subprocess.Popen:
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", PYTHONUNBUFFERED="1",
                   CLEAVE_INTERNAL_TOKEN=self.token, **self.cfg.extra_env)
        if self.redis_password:
            env["CLEAVE_REDIS_PASSWORD"] = self.redis_password
        guarded = [sys.executable, "-m", "services.parent_guard", str(os.getpid()), *argv]
        proc = subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet else None)
        with self._lock:
            self.procs = [(n, p) for n, p in self.procs if n != name] + [(name, proc)]
            self._argv[name] = (argv, quiet)
            self._started[name] = time.monotonic()
        return proc

    def add_worker(self, pool: str) -> str:
        """Start one more instance of ``pool``; it registers in Redis when ready. Returns its name."""
        cfg = self.cfg
        template = cfg.prefill if pool == "prefill" else cfg.decode
        with self._lock:
            name = f"{pool}-{self._count[pool]}"
            self._count[pool] += 1
        self.metrics_ports[name] = port = free_port(cfg.host)
        cores = self.cores.setdefault(name, self._pool_cores.get(pool, ()))  # planner's extras share the pool's
        runtime = dataclasses.replace(template.runtime, model=cfg.model, host=cfg.host,
                                      cpus=cores or template.runtime.cpus)
        worker = dataclasses.replace(template, runtime=runtime, redis_url=self.redis_url, metrics_port=port)
        self._spawn(name, self._cli("worker", pool, "--config-json", to_json(worker)))
        return name

    def plan_cores(self) -> dict[str, tuple[int, ...]]:
        """Give each initial worker instance its own cores, in proportion to its ranks, and the
        router (with Redis) a core of its own when one is left over (``engine.runtime.cores.split``).
        Raises ``ValueError`` when ``--threads`` asks for more threads than a rank gets cores."""
        cfg = self.cfg
        if not cfg.pin_cores:
            return {}
        cores = cfg.cpus or available()
        names = [f"prefill-{i}" for i in range(cfg.prefill_instances)] + \
                [f"decode-{i}" for i in range(cfg.decode_instances)]
        worlds = {"prefill": cfg.prefill.runtime.world_size, "decode": cfg.decode.runtime.world_size}
        weights = [worlds[n.split("-")[0]] for n in names]
        compute = cores[:-1] if len(cores) > sum(weights) else cores   # a spare core for the router
        plan = dict(zip(names, split(compute, weights)))
        if compute != cores:
            plan["router"] = cores[-1:]
        for name, share in plan.items():
            if name == "router":
                continue
            template = cfg.prefill if name.startswith("prefill") else cfg.decode
            ranks, threads = worlds[template.pool], template.runtime.threads
            per_rank = max(1, len(share) // ranks)        # ranks share cores when there are fewer
            if threads > per_rank:
                raise ValueError(f"--threads {threads} per rank, but the split of {len(cores)} cores "
                                 f"({format_cpus(cores)}) gives each of the {ranks} rank(s) of {name} "
                                 f"{per_rank}: lower --threads (0 = one per core) or run fewer instances")
        for pool in ("prefill", "decode"):
            self._pool_cores[pool] = tuple(sorted({c for n, s in plan.items() if n.startswith(pool) for c in s}))
        self.cores = plan
        return plan

    def workers(self, pool: str) -> list[str]:
        """Names of the instances of ``pool`` not asked to stop (running, or dead and about to
        be restarted), oldest first."""
        with self._lock:
            return [n for n, p in self.procs if n.startswith(f"{pool}-") and n not in self._retiring
                    and (p.poll() is None or n in self._restart)]

    def retire_worker(self, pool: str) -> str | None:
        """Ask the newest instance of ``pool`` to drain and exit (SIGTERM); returns its name."""
        names = self.workers(pool)
        if not names:
            return None
        name = names[-1]
        with self._lock:
            self._retiring.add(name)
            proc = next(p for n, p in self.procs if n == name)
        proc.send_signal(signal.SIGTERM)
        return name

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services.cli", "--log-level", self.cfg.log_level, *args]

    @property
    def http_url(self) -> str:
        """Base URL of the router's OpenAI-compatible API (``.../v1``)."""
        return f"http://{self.cfg.host}:{self.http_port}/v1"

    def start(self) -> str:
        """Start everything and wait until ready; returns the router address."""
        cfg = self.cfg
        if not self.redis_url:
            server = shutil.which("redis-server")
            if server is None:
                raise RuntimeError("redis-server is not installed: run `make run` (it installs it) or "
                                   "`apt-get install -y redis-server`, or pass REDIS_URL=redis://host:port")
            rport = free_port(cfg.host)
            self._spawn("redis", [server, "--port", str(rport), "--bind", cfg.host, "--save", "",
                                  "--appendonly", "no", "--loglevel", "warning"], quiet=True)
            self.redis_url = f"redis://{cfg.host}:{rport}/0"
            self._wait_redis(rport)
            self.redis_port = rport
        if self.router_port == 0:
            self.router_port = free_port(cfg.host)
        if self.http_port == 0:
            self.http_port = free_port(cfg.host)
        self.plan_cores()
        for _ in range(cfg.prefill_instances):
            self.add_worker("prefill")
        for _ in range(cfg.decode_instances):
            self.add_worker("decode")
        router_cfg = dataclasses.replace(cfg.router, model=cfg.model, host=cfg.host, redis_url=self.redis_url,
                                         port=self.router_port, http_port=self.http_port)
        router = self._spawn("router", self._cli("router", "--config-json", to_json(router_cfg)))
        if self.cores.get("router"):          # off the workers' cores (its threads inherit this)
            os.sched_setaffinity(router.pid, self.cores["router"])
        address = f"{cfg.host}:{self.router_port}"
        self._wait_ready(address)
        return address

    def _wait_redis(self, port: int) -> None:
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.cfg.host, port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {port}")

    def _wait_ready(self, address: str) -> None:
        """Wait until the router serves (a worker of each pool registered), then until every
        requested instance registered or the ready timeout passes; ``self.ready`` holds the
        registered count of each pool as last seen."""
        deadline = time.time() + self.cfg.ready_timeout_s
        want = {"prefill": self.cfg.prefill_instances, "decode": self.cfg.decode_instances}
        serving = False
        with grpc.insecure_channel(address) as channel:
            health, info = health_pb2_grpc.HealthStub(channel), inference_pb2_grpc.InferenceStub(channel)
            while time.time() < deadline:
                dead = self.dead()
                if dead:
                    raise RuntimeError(f"{dead} exited while the stack was starting (see its log above)")
                try:
                    # the Inference service answers only from the router (not from a worker
                    # that happened to bind the port first)
                    if not serving:
                        resp = health.Check(health_pb2.HealthCheckRequest(service="cleave.v1.Inference"), timeout=1)
                        serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                    if serving:
                        pools = info.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=2).pools
                        self.ready = {p.pool: p.instances for p in pools if p.pool in want}
                        if all(self.ready.get(p, 0) >= n for p, n in want.items()):
                            return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        if not serving:
            raise RuntimeError(f"the stack was not ready within {self.cfg.ready_timeout_s:.0f} s")

    def ready_summary(self) -> str:
        """``prefill x1, decode x2`` once every instance registered, else ``decode 1 of 2 ready``."""
        want = {"prefill": self.cfg.prefill_instances, "decode": self.cfg.decode_instances}
        return ", ".join(f"{p} x{n}" if self.ready.get(p, 0) >= n else f"{p} {self.ready.get(p, 0)} of {n} ready"
                         for p, n in want.items())

    def dead(self) -> str | None:
        """Name and exit code of the first child that exited unasked, if any."""
        with self._lock:
            procs = list(self.procs)
        for name, proc in procs:
            if proc.poll() is not None and name not in self._retiring:
                return f"{name} (exit code {proc.returncode})"
        return None

    def supervise(self) -> str | None:
        """Restart what died (see the module docstring); returns why the stack must end, or None."""
        now = time.monotonic()
        with self._lock:
            procs = list(self.procs)
        for name, proc in procs:
            if proc.poll() is None or name in self._retiring:
                continue
            if name == "router":
                return f"the router exited (code {proc.returncode})"
            if name not in self._restart or self._restart[name][0] == float("inf"):  # a new death
                self._schedule_restart(name, proc.returncode, now)
            at, _ = self._restart[name]
            if now >= at:
                log.warning("restarting %s", name)
                argv, quiet = self._argv[name]
                self._spawn(name, argv, quiet)
                if name == "redis":
                    self._wait_redis(self.redis_port)
                with self._lock:
                    self._restart[name] = (float("inf"), self._restart[name][1])  # until it runs
        for name, (at, backoff) in list(self._restart.items()):
            proc = next((p for n, p in procs if n == name), None)
            if at == float("inf") and proc is not None and proc.poll() is None \
                    and now - self._started.get(name, now) > 60:
                with self._lock:  # ran for a minute: healthy again
                    self._restart.pop(name, None)
                    pool = name.split("-")[0]
                    if pool in self._crashes:
                        self._crashes[pool] = 0
        for pool, crashes in self._crashes.items():
            alive = [n for n, p in procs if n.startswith(f"{pool}-") and p.poll() is None
                     and n not in self._retiring]
            if crashes > self.cfg.max_restarts and not alive:
                return (f"every {pool} instance is down and {crashes - 1} restarts in a row died "
                        f"within a minute (see the logs above)")
        return None

    def _schedule_restart(self, name: str, code: int, now: float) -> None:
        previous = self._restart.get(name)
        backoff = 1.0 if previous is None else min(30.0, previous[1] * 2)
        ran = now - self._started.get(name, now)
        pool = name.split("-")[0]
        if pool in self._crashes:
            self._crashes[pool] = self._crashes[pool] + 1 if ran < 60 else 1
        if ran >= 60:
            backoff = 1.0
        log.error("%s exited (code %s) after %.1f s; restarting it in %.0f s", name, code, ran, backoff)
        with self._lock:
            self._restart[name] = (now + backoff, backoff)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the router first, then the workers, then Redis; kill what does not stop."""
        with self._lock:
            all_procs = list(self.procs)
        for group in (("router",), ("prefill", "decode"), ("redis",)):
            procs = [p for n, p in all_procs if n.startswith(group) and p.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            deadline = time.time() + grace
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        with self._lock:
            self.procs.clear()

