"""Process groups of one instance, passed to models and runners as an object (no globals).

Rank numbering inside an instance of layout ``(tp, pp, cp, ep)`` with ``S = max(tp, ep)``
ranks per stage::

    rank = (pp_rank * cp + cp_rank) * S + s,   s in [0, S)
    tp_rank = s % tp   (TP group: same pp, cp and s // tp)
    ep_rank = s % ep   (EP group: same pp, cp and s // ep)

So TP ranks of a stage are adjacent, a prefill instance (pp = ep = 1) has
``rank = cp_rank * tp + tp_rank`` and a dense decode instance (cp = ep = 1)
``rank = pp_rank * tp + tp_rank`` (as ``engine.layout`` and the KV handoff assume).

:func:`spawn_ranks` starts one process per rank joined by ``torch.distributed`` (gloo on CPU,
NCCL when asked), rendezvous on a free port, and runs a function on each with its
:class:`ParallelGroups`. If any rank dies or fails, the others are terminated and the call
raises, within a bounded time: an instance never hangs on a lost rank.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import os
import queue
import random
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import ParallelConfig


@dataclass(frozen=True)
class Group:
    """One communication group as seen from one rank. ``group`` is None when size is 1."""

    ranks: tuple[int, ...]       # instance ranks in the group, in group-rank order
    rank: int                    # this process's index in ``ranks``
    group: Any = None            # torch.distributed ProcessGroup

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the group in place (no-op for one rank); returns ``t``."""
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.size == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out

    def send(self, t: torch.Tensor, to: int) -> None:
        """Point-to-point send to group rank ``to``."""
        dist.send(t.contiguous(), self.ranks[to], group=self.group)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(t, self.ranks[src], group=self.group)
        return t

    @staticmethod
    def solo(rank: int = 0) -> "Group":
        return Group((rank,), 0)


@dataclass(frozen=True)
class ParallelGroups:
    """Where this rank sits in its instance and the groups it talks to."""

    layout: ParallelConfig
    rank: int
    tp: Group
    pp: Group
    cp: Group
    ep: Group

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def pp_rank(self) -> int:
        return self.pp.rank

    @property
    def cp_rank(self) -> int:
        return self.cp.rank

    @property
    def ep_rank(self) -> int:
        return self.ep.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @staticmethod
    def single() -> "ParallelGroups":
        """One rank, no torch.distributed at all."""
        return ParallelGroups(ParallelConfig(), 0, Group.solo(), Group.solo(), Group.solo(), Group.solo())

    @staticmethod
    def build(layout: ParallelConfig, rank: int) -> "ParallelGroups":
        """Create every group (collectively: all ranks call this with the same layout)."""
        if layout.world_size == 1:
            return ParallelGroups.single()
        members = group_members(layout)
        made: dict[str, Group] = {}
        for axis in ("tp", "pp", "cp", "ep"):
            for ranks in members[axis]:  # every rank creates every group, in the same order
                pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
                if rank in ranks:
                    made[axis] = Group(tuple(ranks), ranks.index(rank), pg)
        return ParallelGroups(layout, rank, made["tp"], made["pp"], made["cp"], made["ep"])


def coords(layout: ParallelConfig, rank: int) -> dict[str, int]:
    """(pp, cp, s, tp, ep) coordinates of ``rank`` (see the module docstring)."""
    s_size = layout.stage_size
    s = rank % s_size
    cp_rank = (rank // s_size) % layout.cp
    pp_rank = rank // (s_size * layout.cp)
    return {"pp": pp_rank, "cp": cp_rank, "s": s, "tp": s % layout.tp, "ep": s % layout.ep}


def group_members(layout: ParallelConfig) -> dict[str, list[tuple[int, ...]]]:
    """For each axis, the list of groups (tuples of instance ranks) that partition the instance."""
    keys = {
        "tp": lambda c: (c["pp"], c["cp"], c["s"] // layout.tp),
        "ep": lambda c: (c["pp"], c["cp"], c["s"] // layout.ep),
        "cp": lambda c: (c["pp"], c["s"]),
        "pp": lambda c: (c["cp"], c["s"]),
    }
    out = {}
    for axis, key in keys.items():
        groups: dict[tuple, list[int]] = {}
        for r in range(layout.world_size):
            groups.setdefault(key(coords(layout, r)), []).append(r)
        out[axis] = [tuple(v) for _, v in sorted(groups.items())]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now, chosen below the kernel's ephemeral range, so that
    no ``bind(port 0)`` by another process (a worker picking its own port) can take it before
    the caller binds it; falls back to an ephemeral port when none is found."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_store(host: str, world: int, timeout_s: float = 600.0):
    """(a master ``TCPStore``, its port): the rendezvous of one group, listening on ``host`` only
    (never every interface) on a free port. Keep the store alive while the group runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, world, True, datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)
    return store, port


def join_group(rank: int, world: int, host: str, port: int, store=None, backend: str = "gloo",
               timeout_s: float = 600.0) -> None:
    """Join the default process group through the store at host:port (``store``: the master
    store when this process serves it, see :func:`rendezvous_store`)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class RankFailure(RuntimeError):
    """A rank of an instance died or raised; the instance was torn down."""


def _rank_main(rank: int, layout: ParallelConfig, port: int, backend: str, fn: Callable,
               args: tuple, results, timeout_s: float) -> None:
    torch.set_num_threads(1)
    try:
        join_group(rank, layout.world_size, "127.0.0.1", port, backend=backend, timeout_s=timeout_s)
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


def spawn_ranks(layout: ParallelConfig, fn: Callable, *args, backend: str = "gloo",
                timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(groups, *args)`` on every rank of ``layout``; returns the results by rank.

    ``fn`` must be picklable (a module-level function). Raises :class:`RankFailure` if a rank
    raises, dies, or the whole run exceeds ``timeout_s``; every rank process is gone by then.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store, port = rendezvous_store("127.0.0.1", layout.world_size, timeout_s)  # lives until we return
    procs = [ctx.Process(target=_rank_main, args=(r, layout, port, backend, fn, args, results, timeout_s),
                         daemon=True) for r in range(layout.world_size)]
    for p in procs:
        p.start()
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
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
