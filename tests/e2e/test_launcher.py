"""`cleave serve` (what `make run` runs): ready line, serving, and a clean stop on SIGINT/SIGTERM."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis

from cleave.v1 import inference_pb2, inference_pb2_grpc
from engine.parallel import free_port
from tests.stack import child_pids, process_alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _serve(model_dir: str, port: int, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "WARNING", "serve",
                             "--port", str(port), "--model", model_dir, "--transport", "tcp",
                             "--kv-cache-mb", "16", "--threads", "1", "--http-port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:
        if line.startswith("Cleave ready"):
            return proc, line
        assert time.time() < deadline, "no ready line"
    raise AssertionError(f"cleave serve exited with {proc.wait()} before it was ready")


def _one_request(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        msgs = list(stub.Generate(inference_pb2.GenerateRequest(
            prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=4)), timeout=60))
    assert msgs[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_serve_prints_ready_line_and_a_signal_stops_every_process(tiny_llama_dir, sig):
    port = free_port()
    proc, line = _serve(tiny_llama_dir, port)
    try:
        assert f"127.0.0.1:{port}" in line
        http = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert http, line
        with urllib.request.urlopen(f"http://127.0.0.1:{http.group(1)}/health", timeout=10) as resp:
            assert resp.status == 200  # the OpenAI-compatible API is up beside gRPC
        children = child_pids(proc.pid)
        assert len(children) == 4  # redis, prefill, decode, router
        _one_request(port)
        proc.send_signal(sig)
        # SIGKILL gives the launcher no chance: its children notice through PR_SET_PDEATHSIG
        assert proc.wait(timeout=60) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        deadline = time.time() + 20
        while any(process_alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(process_alive(c) for c in children), "orphaned processes"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_uses_the_given_redis(tiny_llama_dir, redis_url):
    port = free_port()
    proc, _ = _serve(tiny_llama_dir, port, "--redis-url", redis_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert len(child_pids(proc.pid)) == 3  # no private redis
        pools = sorted(k.split(":")[2] for k in client.scan_iter("cleave:worker:*"))
        assert pools == ["decode", "prefill"]
        _one_request(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert list(client.scan_iter("cleave:worker:*")) == []  # workers deregistered
        assert client.ping()  # an external Redis is left running
    finally:
        if proc.poll() is None:
            proc.kill()
