"""The one way Cleave starts rank processes on this host, and :func:`spawn_ranks`.

Who calls what: the local and external executors (``engine.runtime.executor``) start the
ranks of their host with :func:`start_rank`; tests and benches call
:func:`spawn_ranks` to run a function on every rank of a layout (gloo on CPU, NCCL on CUDA,
rendezvous on a free port of 127.0.0.1). If any rank dies or fails, the others are terminated
and the call raises :class:`RankFailure` within a bounded time: nothing hangs on a lost rank.
"""
from __future__ import annotations

import dataclasses
import io
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.layout import ParallelConfig
from engine.parallel import ParallelGroups
from engine.runtime.device import backend_for, rank_device
from engine.runtime.lifetime import die_with_parent
from engine.runtime.rendezvous import connect_store, join, serve_store

class RankFailure(RuntimeError):
    """A rank of a :func:`spawn_ranks` run died or raised; every rank was torn down."""


def start_rank(target: Callable, *args) -> mp.Process:
    """Start ``target(*args)`` in a fresh interpreter (``spawn``: no forked CUDA or gRPC state)
    that dies with this process."""
    proc = mp.get_context("spawn").Process(target=_guarded, args=(target, args), daemon=True)
    proc.start()
    return proc


def _guarded(target: Callable, args: tuple) -> None:
    die_with_parent()
    target(*args)


def stop_processes(procs: list, grace_s: float = 5.0) -> None:
    """Join each process for ``grace_s``, then terminate, then kill."""
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()


def _run_rank(rank: int, layout: ParallelConfig, port: int, device: str, fn: Callable,
              args: tuple, results, timeout_s: float) -> None:
    torch.set_num_threads(1)
    try:
        store = connect_store("127.0.0.1", port, layout.world_size, timeout_s)
        dev = rank_device(torch.device(device), rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        join(rank, layout.world_size, store, backend_for(dev), timeout_s, "127.0.0.1")
        groups = ParallelGroups.build(layout, rank)
        # bytes, not tensors: a queued tensor is shared through a file descriptor that breaks
        # when this process exits before the parent reads it
        buf = io.BytesIO()
        torch.save(fn(groups, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # report, never hang the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(layout: ParallelConfig, fn: Callable, *args, device: str = "cpu",
                timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(groups, *args)`` on every rank of ``layout``; returns the results by rank.

    ``fn`` must be picklable (a module-level function); results come back on the CPU.
    ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (rank ``r`` on ``cuda:r``, NCCL). Raises
    :class:`RankFailure` if a rank raises, dies, or the whole run exceeds ``timeout_s``;
    every rank process is gone by then."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store, port = serve_store("127.0.0.1", 0, layout.world_size, timeout_s)  # lives until we return
    procs = [start_rank(_run_rank, r, layout, port, device, fn, args, results, timeout_s)
             for r in range(layout.world_size)]
    out: dict[int, Any] = {}
    deadline = time.time() + timeout_s
    try:
        while len(out) < len(procs):
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RankFailure(f"rank {dead[0]} of layout {dataclasses.asdict(layout)} died "
                                      f"(exit code {procs[dead[0]].exitcode})") from None
                if time.time() > deadline:
                    raise RankFailure(f"layout {dataclasses.asdict(layout)} did not finish within "
                                      f"{timeout_s:.0f} s") from None
                continue
            if status == "error":
                raise RankFailure(f"rank {rank} failed: {value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
        return [out[r] for r in range(len(procs))]
    finally:
        stop_processes(procs)
        del store
