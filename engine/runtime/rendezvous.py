"""How the ranks of one instance find each other: a ``TCPStore`` served by rank 0, then
``torch.distributed`` groups (NCCL or gloo for tensors, a gloo group for control messages).

Who calls what: rank 0 (``engine.runtime.executor``) calls :func:`serve_store`, publishes the
instance's :class:`~engine.runtime.config.RuntimeConfig` under ``cleave/config`` and calls
:func:`join` with the store; every other rank (spawned locally by rank 0, or started on its own
by ``cleave rank`` / Kubernetes) calls :func:`connect_store` and :func:`join`. Where rank 0 is
comes from flags or the usual variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``; see :class:`~engine.runtime.config.Rendezvous`), never a
hard-coded loopback.

Joining is bounded: each rank announces itself with ``cleave/joined/<rank>`` = its address,
and rank 0 waits at most ``timeout_s`` for all of them, then raises :class:`RendezvousTimeout`
naming the ranks that never came. After the join each rank bumps ``cleave/alive/<rank>`` every
second (:class:`Liveness`): rank 0's watchdog declares a rank whose counter stops moving dead,
and a rank that loses rank 0's store exits (nothing left to serve).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import threading
import time

import torch.distributed as dist

from common.net import interface_of

log = logging.getLogger(__name__)

CONFIG_KEY = "cleave/config"


class RendezvousTimeout(RuntimeError):
    """Not every rank joined (or rank 0's store was unreachable) within the timeout."""


def serve_store(host: str, port: int, world: int, timeout_s: float):
    """``(master TCPStore, port)`` listening on ``host`` only (``port`` 0 = a free one).
    Keep the store alive while the instance runs: the other ranks talk to it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RendezvousTimeout(f"cannot serve the rendezvous on {host}:{port}: {exc}") from exc
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(host, port, world, True, datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)
    return store, port


def connect_store(addr: str, port: int, world: int, timeout_s: float):
    """A client of rank 0's store at ``addr:port``; :class:`RendezvousTimeout` when unreachable."""
    try:
        return dist.TCPStore(addr, port, world, False, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # torch raises DistNetworkError / RuntimeError after its timeout
        raise RendezvousTimeout(f"could not reach rank 0's rendezvous at {addr}:{port} within "
                                f"{timeout_s:.0f} s: {exc}") from exc


def publish(store, key: str, value) -> None:
    store.set(key, pickle.dumps(value))


def fetch(store, key: str):
    return pickle.loads(store.get(key))


def wait_for_ranks(store, world: int, timeout_s: float, where: str) -> None:
    """Rank 0: return once ranks 1..world-1 announced themselves, else raise
    :class:`RendezvousTimeout` naming the missing ranks."""
    deadline = time.monotonic() + timeout_s
    keys = [f"cleave/joined/{r}" for r in range(1, world)]
    while True:
        missing = [r for r, k in enumerate(keys, start=1) if not store.check([k])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RendezvousTimeout(
                f"rank(s) {missing} of {world} never joined the rendezvous at {where} within "
                f"{timeout_s:.0f} s: start them (cleave rank ... --master-addr/--master-port) or "
                f"check that they can reach this address")
        time.sleep(0.05)


def join(rank: int, world: int, store, backend: str, timeout_s: float, host: str, where: str = ""):
    """Announce ``rank`` (serving on ``host``), (rank 0) wait for the others, init
    ``torch.distributed`` with ``backend`` for tensors, and return a gloo group of every rank
    for control messages. gloo and NCCL sockets use the interface that owns ``host``."""
    store.set(f"cleave/joined/{rank}", host or socket.gethostname())
    if rank == 0:
        wait_for_ranks(store, world, timeout_s, where)
    iface = interface_of(host)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if iface and var not in os.environ:      # else gloo picks the interface of the hostname
            os.environ[var] = iface
    timeout = datetime.timedelta(seconds=max(timeout_s, 60.0))
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD


class Liveness:
    """Each rank bumps its ``cleave/alive/<rank>`` counter every ``period_s`` (a thread);
    :meth:`stalled` (rank 0) names the ranks whose counter stopped for ``grace_s``.

    A rank whose bump fails for ``grace_s`` (rank 0 and its store are gone) calls ``on_lost``
    (the rank exits: there is nothing left to serve)."""

    def __init__(self, store, rank: int, period_s: float = 1.0, grace_s: float = 10.0,
                 on_lost=None) -> None:
        self.store, self.rank, self.period_s, self.grace_s = store, rank, period_s, grace_s
        self._seen: dict[int, tuple[int, float]] = {}
        self._on_lost = on_lost
        self._stop = threading.Event()

    def start(self) -> "Liveness":
        threading.Thread(target=self._beat, name=f"rank{self.rank}-liveness", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.period_s):
            try:
                self.store.add(f"cleave/alive/{self.rank}", 1)
                last_ok = time.monotonic()
            except Exception as exc:
                if time.monotonic() - last_ok > self.grace_s and self._on_lost is not None:
                    log.error("rank %d lost rank 0's store for %.0f s (%s): leaving", self.rank,
                              self.grace_s, exc)
                    self._on_lost()
                    return

    def stalled(self, ranks) -> list[int]:
        """Ranks (of ``ranks``) whose counter has not moved for ``grace_s``."""
        now, out = time.monotonic(), []
        for r in ranks:
            count = self.store.add(f"cleave/alive/{r}", 0)
            prev = self._seen.get(r)
            if prev is None or prev[0] != count:
                self._seen[r] = (count, now)
            elif now - prev[1] > self.grace_s:
                out.append(r)
        return out
