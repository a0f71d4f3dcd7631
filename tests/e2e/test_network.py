"""What anyone on the network can reach (fault report, part 7), on a real multi-rank stack.

Every listening socket of every process of the stack (router, workers, their extra ranks,
Redis) binds the address the stack was told, and no process carries the Redis password or the
internal token in its argv.
"""
from __future__ import annotations

import psutil
import pytest

from tests.conftest import hf_greedy, start_redis

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PASSWORD = "pw-9f3c2a"


@pytest.fixture(scope="module")
def password_redis():
    proc, url = start_redis(PASSWORD)
    yield url
    proc.terminate()
    proc.wait(10)


def _tree(pids):
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def test_every_listener_binds_the_given_host_and_no_secret_is_in_argv(tiny_llama_dir, password_redis):
    from services.launcher import StackConfig, workers
    from tests.stack import RunningStack

    stack = RunningStack(StackConfig(
        port=0, model=tiny_llama_dir, log_level="WARNING", redis_url=password_redis,
        **workers(transport="ucx", num_blocks=64, block_size=8, threads=1, prefill={"tp": 2}, decode={"tp": 2})))
    try:
        from engine.loader import load_reference_model, resolve_model
        ref = load_reference_model(resolve_model(tiny_llama_dir))
        assert stack.generate(token_ids=[5, 6, 7], max_tokens=6).token_ids == hf_greedy(ref, [5, 6, 7], 6)
        procs = _tree([p.pid for _, p in stack.stack.procs])
        assert len(procs) >= 5  # router, 2 workers and their second ranks (parent guards aside)
        listeners = {}
        for p in procs:
            cmdline = " ".join(p.cmdline())
            assert PASSWORD not in cmdline and stack.stack.token not in cmdline, cmdline
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    ip = c.laddr.ip.removeprefix("::ffff:")  # an IPv4-mapped socket is that IPv4 address
                    listeners.setdefault(ip, []).append((p.pid, c.laddr.port))
        assert set(listeners) == {"127.0.0.1"}, listeners
    finally:
        stack.close()
