"""The local stack behind ``make run`` / ``cleave serve``: Redis, workers and router as processes.

Lifecycle:

1. Start a private ``redis-server`` on a free port (unless a Redis URL is given).
2. Start the prefill and decode instances (``cleave worker ...``, free ports, registering
   in Redis) and the router on the requested port.
3. Wait until the router's gRPC health check says SERVING (a worker of each pool is
   registered), then print one line saying where it listens.
4. With a planner (``cleave serve --planner``), a thread runs ``services.planner`` against
   :class:`services.scaling_local.LocalBackend`, which adds workers through
   :meth:`LocalStack.add_worker` and retires them through :meth:`LocalStack.retire_worker`
   (SIGTERM: the worker drains, then exits; a retired worker exiting is not a failure).
5. On SIGINT/SIGTERM, or when any other child dies, stop every child (SIGTERM, then SIGKILL
   after a grace period) and the private Redis. Children also get SIGTERM if this process dies
   (``PR_SET_PDEATHSIG``, set by ``services.parent_guard``), so nothing is left behind.
"""
from __future__ import annotations

import logging
import os
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

from engine.parallel import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    port: int = 50051
    host: str = "127.0.0.1"
    redis_url: str = ""                  # "" = start a private redis-server
    model: str = ""
    prefill_instances: int = 1
    decode_instances: int = 1
    worker_args: tuple[str, ...] = ()    # extra flags for every worker
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    ready_timeout_s: float = 300.0
    log_level: str = "INFO"
    extra_env: dict = field(default_factory=dict)
    planner: object = None               # a services.planner.PlannerConfig: run the planner too

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.prefill_instances < 1 or self.decode_instances < 1:
            raise ValueError(f"need at least one instance per pool, got prefill={self.prefill_instances} "
                             f"decode={self.decode_instances}")


class LocalStack:
    """Starts and stops the processes of one local deployment. Used by the CLI and by tests."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis_url = cfg.redis_url
        self.router_port = cfg.port
        self._lock = threading.Lock()        # the planner's thread adds and retires workers
        self._retiring: set[str] = set()     # names of workers asked to drain and exit
        self._count = {"prefill": 0, "decode": 0}
        self._common: list[str] = []

    def _spawn(self, name: str, argv: list[str], quiet: bool = False) -> subprocess.Popen:
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", PYTHONUNBUFFERED="1", **self.cfg.extra_env)
        guarded = [sys.executable, "-m", "services.parent_guard", str(os.getpid()), *argv]
        proc = subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet else None)
        with self._lock:
            self.procs.append((name, proc))
        return proc

    def add_worker(self, pool: str) -> str:
        """Start one more instance of ``pool``; it registers in Redis when ready. Returns its name."""
        cfg = self.cfg
        extra = cfg.prefill_args if pool == "prefill" else cfg.decode_args
        with self._lock:
            name = f"{pool}-{self._count[pool]}"
            self._count[pool] += 1
        self._spawn(name, self._cli("worker", pool, *self._common, *cfg.worker_args, *extra))
        return name

    def workers(self, pool: str) -> list[str]:
        """Names of the running instances of ``pool`` not asked to stop, oldest first."""
        with self._lock:
            return [n for n, p in self.procs if n.startswith(f"{pool}-") and n not in self._retiring
                    and p.poll() is None]

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
        if self.router_port == 0:
            self.router_port = free_port(cfg.host)
        self._common = common = ["--model", cfg.model, "--redis-url", self.redis_url, "--host", cfg.host]
        for _ in range(cfg.prefill_instances):
            self.add_worker("prefill")
        for _ in range(cfg.decode_instances):
            self.add_worker("decode")
        self._spawn("router", self._cli("router", *common, "--port", str(self.router_port), *cfg.router_args))
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
        deadline = time.time() + self.cfg.ready_timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.time() < deadline:
                dead = self.dead()
                if dead:
                    raise RuntimeError(f"{dead} exited while the stack was starting (see its log above)")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"the stack was not ready within {self.cfg.ready_timeout_s:.0f} s")

    def dead(self) -> str | None:
        """Name and exit code of the first child that exited unasked, if any."""
        with self._lock:
            procs = list(self.procs)
        for name, proc in procs:
            if proc.poll() is not None and name not in self._retiring:
                return f"{name} (exit code {proc.returncode})"
        return None

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


def run_stack(cfg: StackConfig) -> int:
    """Foreground ``cleave serve``: start, print the ready line, supervise, stop on a signal."""
    stack = LocalStack(cfg)
    stopping = False
    started = False
    planner = None

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        if not started:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        address = stack.start()
        started = True
        print(f"Cleave ready: router listening on {address} (model {cfg.model or 'SmolLM2-135M-Instruct'}, "
              f"redis {stack.redis_url}, prefill x{cfg.prefill_instances}, decode x{cfg.decode_instances}); "
              f"Ctrl-C stops", flush=True)
        if cfg.planner is not None:
            from services.scaling_local import PlannerThread
            planner = PlannerThread(stack, cfg.planner).start()
            print(f"Cleave planner: scaling prefill within [{cfg.planner.prefill_min}, "
                  f"{cfg.planner.prefill_max}] and decode within [{cfg.planner.decode_min}, "
                  f"{cfg.planner.decode_max}] instances", flush=True)
        while not stopping:
            dead = stack.dead()
            if dead:
                log.error("%s exited; stopping the stack", dead)
                return 1
            time.sleep(0.2)
        return 0
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        if not stopping:
            print(f"cleave serve: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if planner is not None:
            planner.stop()
        stack.stop()
