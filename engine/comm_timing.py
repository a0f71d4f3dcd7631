"""Timing the collectives of one instance's ranks, for the capacity planner's calibration.

Called on every rank spawned by ``services.capacity.calibrate.measure_collectives`` (through
``spawn_ranks``), which fits the times to a line per op and rank count. It lives in the
engine because it drives ``torch.distributed`` directly, which only the engine does.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def time_collectives(groups, sizes, reps: int) -> dict:
    """One rank: seconds each op adds when interleaved with compute (as in a forward), by size.

    Each of ``N`` iterations runs a small matmul then the op; the op's cost is the loop time
    less ``N`` matmuls (measured with every rank computing at once), so waiting for a peer that
    was scheduled late counts, as it does in the engine. ``send_recv`` is a ping-pong between
    ranks 0 and 1 (compute, send, receive): half the time less the compute per hop.

    ``groups``: this rank's ``ParallelGroups`` (unused: the ops run on the whole world);
    ``sizes``: bytes per rank. Returns ``{op: [[bytes, seconds], ...]}``, ``send_recv`` empty
    unless the world has exactly two ranks.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    a, b = torch.randn(128, 512), torch.randn(512, 512)          # ~0.5 ms: a peer sleeps in recv
    work = lambda: a @ b                                          # noqa: E731

    def loop(fn, n):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    out = {"all_reduce": [], "all_to_all": [], "send_recv": []}
    for size in sizes:
        x = torch.ones(size // 4 // world * world)                # all_to_all splits it evenly
        y = torch.empty_like(x)
        n = 10 if size <= 1 << 17 else 4
        ops = {"all_reduce": lambda: dist.all_reduce(x), "all_to_all": lambda: dist.all_to_all_single(y, x)}
        if world == 2:
            ops["send_recv"] = (lambda: (dist.send(x, 1), dist.recv(y, 1), work())) if rank == 0 else \
                (lambda: (dist.recv(y, 0), work(), dist.send(x, 0)))
        for name, op in ops.items():
            times = []
            for _ in range(reps):
                base = loop(work, n)
                if name == "send_recv":
                    times.append(max(0.0, (loop(op, n) - 2 * base) / (2 * n)))
                else:
                    times.append(max(0.0, (loop(lambda: (work(), op()), n) - base) / n))
            out[name].append([size, statistics.median(times)])
    return out
