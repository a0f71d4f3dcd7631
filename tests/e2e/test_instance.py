"""A multi-rank instance as processes: a rank that dies takes the whole instance down, never a hang."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.stack import child_pids, process_alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = child_pids(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_killed_rank_ends_its_instance(tiny_llama_dir, redis_url):
    worker = None
    try:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        worker = subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "WARNING", "worker",
                                   "decode", "--tp", "2", "--model", tiny_llama_dir, "--transport", "tcp",
                                   "--num-blocks", "32", "--redis-url", redis_url],
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while not list(client.scan_iter("cleave:worker:decode:*")):
            assert worker.poll() is None, worker.stderr.read()
            assert time.time() < deadline, "the TP2 decode instance never registered"
            time.sleep(0.2)
        ranks = [p for p in _descendants(worker.pid) if process_alive(p) and "spawn_main" in _cmdline(p)]
        assert len(ranks) == 1, "rank 1 should run as a spawned child of the service (rank 0)"
        os.kill(ranks[0], signal.SIGKILL)
        assert worker.wait(timeout=60) != 0          # the instance goes down, reporting failure
        assert "exited" in worker.stderr.read()       # and says which rank
        assert list(client.scan_iter("cleave:worker:decode:*")) == []  # out of the routing set
        time.sleep(1)
        assert not any(process_alive(p) for p in ranks), "a rank outlived its instance"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
