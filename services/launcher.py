"""The local stack behind ``make run`` / ``cleave serve``: Redis, workers and router as processes.

Lifecycle:

1. Start a private ``redis-server`` on a free port (unless a Redis URL is given).
2. Start the prefill and decode instances (``cleave worker ...``, free ports, registering
   in Redis) and the router on the requested port.
3. Wait until the router's gRPC health check says SERVING (a worker of each pool is
   registered), then print one line saying where it listens.
4. On SIGINT/SIGTERM, or when any child dies, stop every child (SIGTERM, then SIGKILL after
   a grace period) and the private Redis. Children also get SIGTERM if this process dies
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

    def _spawn(self, name: str, argv: list[str], quiet: bool = False) -> subprocess.Popen:
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", PYTHONUNBUFFERED="1", **self.cfg.extra_env)
        guarded = [sys.executable, "-m", "services.parent_guard", str(os.getpid()), *argv]
        proc = subprocess.Popen(guarded, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet else None)
        self.procs.append((name, proc))
        return proc

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
        common = ["--model", cfg.model, "--redis-url", self.redis_url, "--host", cfg.host]
        for i in range(cfg.prefill_instances):
            self._spawn(f"prefill-{i}", self._cli("worker", "prefill", *common, *cfg.worker_args, *cfg.prefill_args))
        for i in range(cfg.decode_instances):
            self._spawn(f"decode-{i}", self._cli("worker", "decode", *common, *cfg.worker_args, *cfg.decode_args))
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
        """Name and exit code of the first child that exited, if any."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} (exit code {proc.returncode})"
        return None

    def stop(self, grace: float = 10.0) -> None:
        """Stop the router first, then the workers, then Redis; kill what does not stop."""
        for group in (("router",), ("prefill", "decode"), ("redis",)):
            procs = [p for n, p in self.procs if n.startswith(group) and p.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            deadline = time.time() + grace
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


def run_stack(cfg: StackConfig) -> int:
    """Foreground ``cleave serve``: start, print the ready line, supervise, stop on a signal."""
    stack = LocalStack(cfg)
    stopping = False
    started = False

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
        stack.stop()
