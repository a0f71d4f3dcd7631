"""Process groups of one instance, passed to models and runners as an object (no globals).

Rank numbering inside an instance of layout ``(tp, pp, cp, ep)`` with ``S = max(tp, ep)``
ranks per stage::

    rank = (pp_rank * cp + cp_rank) * S + s,   s in [0, S)
    tp_rank = s % tp   (TP group: same pp, cp and s // tp)
    ep_rank = s % ep   (EP group: same pp, cp and s // ep)

So TP ranks of a stage are adjacent, a prefill instance (pp = ep = 1) has
``rank = cp_rank * tp + tp_rank`` and a dense decode instance (cp = ep = 1)
``rank = pp_rank * tp + tp_rank`` (as ``common.layout`` and the KV handoff assume).

The process groups are made by the rank runtime (``engine.runtime``: rendezvous, spawning,
executors) once every rank joined ``torch.distributed``; this module only names them.
"""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.layout import ParallelConfig


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
        """Point-to-point receive from group rank ``src`` into ``t``; returns ``t``."""
        dist.recv(t, self.ranks[src], group=self.group)
        return t

    def isend(self, t: torch.Tensor, to: int, tag: int = 0):
        """Non-blocking send to group rank ``to``; returns a work handle (``wait()``/``is_completed()``).
        Keep ``t`` alive until the handle completes."""
        return dist.isend(t, self.ranks[to], group=self.group, tag=tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int = 0):
        """Non-blocking receive from group rank ``src`` into ``t``; returns a work handle."""
        return dist.irecv(t, self.ranks[src], group=self.group, tag=tag)

    @staticmethod
    def solo(rank: int = 0) -> "Group":
        return Group((rank,), 0)


class AsyncSender:
    """Non-blocking point-to-point sends over a group, kept alive until completed."""

    def __init__(self, group: Group):
        self.group, self.pending = group, []

    def send(self, t: torch.Tensor, to: int) -> None:
        t = t.contiguous()
        self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]
        self.pending.append((self.group.isend(t, to), t))

    def flush(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []


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
