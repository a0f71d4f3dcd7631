"""``cleave rank``: ranks of an instance started on their own.

Who calls what: ``services.cli`` builds a ``WorkerConfig`` from ``cleave rank``'s flags (the
same flags as ``cleave worker``: they are declared once, on ``services.config.WorkerConfig``
and the ``engine.runtime.config.RuntimeConfig`` it holds, rendezvous flags included, with
torchrun's environment variables as fallbacks) and runs :func:`run_rank` on its runtime part.
A multi-host instance is one ``cleave worker`` (rank 0, the service: gRPC, Redis record, its
host's ranks) plus one ``cleave rank`` per other host::

    cleave worker decode --tp 2 --pp 2 --nproc-per-node 2 --master-port 29500 --host 10.0.0.1 ...
    cleave rank decode --tp 2 --pp 2 --node-rank 1 --nproc-per-node 2 \\
        --master-addr 10.0.0.1 --master-port 29500 --host 10.0.0.2

``cleave rank`` serves nothing itself: it joins rank 0's rendezvous, takes the instance's
config from rank 0 (refusing a model or layout that differs from its own flags), runs rank 0's
calls and exits when rank 0 goes away (code 1) or stops the instance (code 0).
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


def run_rank(own) -> int:
    """Run this host's ranks of an instance (``own``: a ``RuntimeConfig`` from this command's
    flags) until rank 0 stops them; returns the worst exit code."""
    from engine.runtime.executor import rank_main, rank_process
    from engine.runtime.spawn import start_rank

    rdv = own.rendezvous
    if not rdv.master_addr or not rdv.master_port:
        raise ValueError("cleave rank needs rank 0's address and port: --master-addr and --master-port "
                         "(or MASTER_ADDR and MASTER_PORT)")
    ranks = rdv.local_ranks(own.world_size)
    if 0 in ranks:
        raise ValueError("rank 0 is the service process (cleave worker); cleave rank runs ranks >= 1: "
                         "check --rank / --node-rank")
    master = (rdv.master_addr, rdv.master_port)
    log.info("ranks %s of an instance of %d joining %s:%d", ranks, own.world_size, *master)
    if len(ranks) == 1:
        _outlive_sigterm()
        return rank_main(ranks[0], max(rdv.local_rank, 0), own, master, strict=True)
    procs = [start_rank(rank_process, r, i, own, master, True) for i, r in enumerate(ranks)]
    _outlive_sigterm()          # after the spawn: the children keep the default disposition
    for p in procs:
        p.join()
    return max(p.exitcode or 0 for p in procs)


def _outlive_sigterm() -> None:
    """Ignore SIGTERM: when a pod group is deleted every pod gets it at once, and a rank that
    left at once would break rank 0's drain; ranks leave when rank 0 stops the instance or goes
    away (SIGKILL after the grace period still ends them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("SIGTERM is ignored: these ranks leave when rank 0 stops the instance or goes away")

