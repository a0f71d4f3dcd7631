"""``cleave rank``: ranks of an instance started on their own, and the runtime flags every
command that runs a model shares (device, dtype, CUDA graphs, rendezvous).

Who calls what: ``services.cli`` adds :func:`add_runtime_flags` to ``cleave worker`` and
``cleave rank``, turns them into a ``Rendezvous`` with :func:`rendezvous_from`, and runs
:func:`run_rank` for ``cleave rank``. A multi-host instance is one ``cleave worker`` (rank 0,
the service: gRPC, Redis record, its host's ranks) plus one ``cleave rank`` per other host::

    cleave worker decode --tp 2 --pp 2 --nproc-per-node 2 --master-port 29500 --host 10.0.0.1 ...
    cleave rank decode --tp 2 --pp 2 --node-rank 1 --nproc-per-node 2 \\
        --master-addr 10.0.0.1 --master-port 29500 --host 10.0.0.2

``cleave rank`` serves nothing itself: it joins rank 0's rendezvous, takes the instance's
config from rank 0 (refusing a model or layout that differs from its own flags), runs rank 0's
calls and exits when rank 0 goes away (code 1) or stops the instance (code 0).
"""
from __future__ import annotations

import argparse
import logging
import signal

log = logging.getLogger(__name__)


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--device/--dtype/--cuda-graphs and the rendezvous flags (torchrun's names and variables)."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where the model runs: auto = CUDA when present, else CPU; rank r of a host "
                        "uses cuda:<local rank>")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model and KV cache dtype: auto = bfloat16 on CUDA, float32 on CPU (exact)")
    p.add_argument("--weights-dtype", default="fp32", choices=["fp32", "bf16", "int8", "int4"],
                   help="how the linear and embedding weights are held: fp32 = in --dtype (exact, the "
                        "default); bf16; int8 / int4 = weight-only quantized (GGUF Q8_0/Q4_0/Q4_1/Q4_K "
                        "codes used as they are where the kernel takes them; CPU only). Not "
                        "token-exact: see bench/quant.py for agreement and perplexity")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps from CUDA graphs captured per batch-size bucket (CUDA only)")
    p.add_argument("--cpus", default="",
                   help="cores for this command's ranks, e.g. 0-3 (split evenly between them; each rank "
                        "pins to its share and runs one torch thread per core); empty = not pinned")
    p.add_argument("--master-addr", default=None,
                   help="rank 0's rendezvous address (env MASTER_ADDR; default: rank 0's --host)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rank 0's rendezvous port (env MASTER_PORT; default 0 = a free port, only "
                        "when every rank runs on rank 0's host)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks this command runs on this host (env LOCAL_WORLD_SIZE; default: all "
                        "ranks of the instance)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this host's index: it runs ranks node_rank*nproc .. +nproc-1 (env NODE_RANK; "
                        "default 0)")
    p.add_argument("--rank", type=int, default=None,
                   help="cleave rank: run exactly this one rank (env RANK) instead of a node's ranks")
    p.add_argument("--local-rank", type=int, default=None,
                   help="CUDA device index of a single --rank process (env LOCAL_RANK; default 0)")
    p.add_argument("--rendezvous-timeout", type=float, default=300.0,
                   help="seconds rank 0 waits for every rank to join (it then names the missing ones)")


def rendezvous_from(args, single_rank_default: bool = False):
    """The ``Rendezvous`` of the flags (unset ones from the environment)."""
    from engine.runtime.config import Rendezvous
    return Rendezvous.from_env(master_addr=args.master_addr, master_port=args.master_port,
                               nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                               rank=args.rank if args.command == "rank" else -1,   # a worker is rank 0
                               local_rank=args.local_rank, timeout_s=args.rendezvous_timeout)


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

