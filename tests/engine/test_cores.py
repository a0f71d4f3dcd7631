"""Cores are given, not fought over: the local stack's split and a rank's pinning
(``engine.runtime.cores``, ``services.launcher.LocalStack.plan_cores``)."""
from __future__ import annotations

import os

import pytest

from engine.runtime.cores import format_cpus, parse_cpus, split


@pytest.mark.unit
def test_core_lists_parse_and_format():
    assert parse_cpus("0-3,6") == (0, 1, 2, 3, 6) and format_cpus((6, 0, 1, 2, 3)) == "0-3,6"
    assert parse_cpus("") == ()
    for bad in ("a", "3-", "1,1", "-1"):
        with pytest.raises(ValueError, match="--cpus"):
            parse_cpus(bad)


@pytest.mark.unit
@pytest.mark.parametrize("cores, weights", [(8, [1, 1]), (8, [1, 4]), (16, [1, 2, 4, 1]), (3, [1, 1, 1]),
                                            (5, [2, 1])])
def test_split_gives_disjoint_shares_in_proportion(cores, weights):
    shares = split(range(cores), weights)
    flat = [c for s in shares for c in s]
    assert sorted(flat) == list(range(cores))                 # every core given, none twice
    assert all(len(s) >= 1 for s in shares)
    heavy, light = max(range(len(weights)), key=weights.__getitem__), min(range(len(weights)), key=weights.__getitem__)
    assert len(shares[heavy]) >= len(shares[light])


@pytest.mark.unit
def test_fewer_cores_than_processes_share_round_robin():
    assert split((0, 1), [1, 1, 1]) == [(0,), (1,), (0,)]


def _stack(threads=0, decode=None, **kw):
    from services.launcher import LocalStack, StackConfig, workers
    return LocalStack(StackConfig(port=0, **workers(threads=threads, decode=decode), **kw))


@pytest.mark.unit
def test_stack_plan_keeps_compute_processes_apart_and_the_router_off_them():
    plan = _stack(cpus=tuple(range(8)), decode={"tp": 2, "pp": 2}, prefill_instances=2).plan_cores()
    compute = [set(v) for k, v in plan.items() if k != "router"]
    assert sum(len(s) for s in compute) == len(set().union(*compute))   # no two share a core
    assert plan["router"] == (7,) and all(7 not in s for s in compute)
    assert len(plan["decode-0"]) >= 4 > len(plan["prefill-0"])          # 4 ranks get more cores
    two = _stack(cpus=(0, 1)).plan_cores()
    assert two == {"prefill-0": (0,), "decode-0": (1,)}                  # no spare core: router shares


@pytest.mark.unit
def test_more_threads_than_cores_is_refused_clearly():
    from common.layout import ParallelConfig
    from engine.runtime.config import RuntimeConfig

    with pytest.raises(ValueError, match=r"--threads 2 per rank.*rank\(s\) of prefill-0 1"):
        _stack(cpus=(0, 1), threads=2).plan_cores()
    with pytest.raises(ValueError, match=r"each of the 2 rank\(s\) on this host gets 1 core"):
        RuntimeConfig(threads=2, cpus=(0, 1), parallel=ParallelConfig(tp=2))
    # more ranks than cores: they share, one thread each (what a 4-rank instance on 2 cores does)
    assert _stack(cpus=(0, 1), threads=1, decode={"tp": 4}).plan_cores()
    RuntimeConfig(threads=1, cpus=(0,), parallel=ParallelConfig(tp=4))


@pytest.mark.e2e
def test_running_workers_are_pinned_to_their_share(tiny_stack):
    stack = tiny_stack.stack
    for name, proc in stack.procs:
        if name in stack.cores and name != "router":
            assert os.sched_getaffinity(proc.pid) == set(stack.cores[name]), name
