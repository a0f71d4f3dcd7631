"""CPU cores given to processes, so that compute processes do not fight over them.

Who calls what: the local stack (``services.launcher``) splits the cores it may use between
its worker instances with :func:`split` and passes each its share as ``--cpus``; an instance
splits its share between its ranks on this host the same way, and each rank pins itself with
:func:`pin` (CPU affinity + torch threads). Torch-free: the launcher imports it.

Rule of :func:`split`: the cores are cut into contiguous runs, one per consumer, in
proportion to the ranks each consumer runs (at least one core each); when there are fewer
cores than consumers, consumers share cores round-robin (and a warning says so).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> ``(0, 1, 2, 3, 6)`` (the ``taskset -c`` list syntax); ``""`` -> ``()``.
    Raises ``ValueError`` quoting the text on a malformed or empty list, or a duplicate."""
    if not text.strip():
        return ()
    cores: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if last < first:
                raise ValueError
            cores.extend(range(first, last + 1))
    except ValueError:
        raise ValueError(f"--cpus {text!r} is not a core list like 0-3,6") from None
    if not cores or len(set(cores)) != len(cores) or min(cores) < 0:
        raise ValueError(f"--cpus {text!r} must name each core (>= 0) once")
    return tuple(cores)


def format_cpus(cores) -> str:
    """``(0, 1, 2, 3, 6)`` -> ``"0-3,6"``."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def available() -> tuple[int, ...]:
    """The cores this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0)))


def split(cores, weights: list[int]) -> list[tuple[int, ...]]:
    """Cut ``cores`` into one share per consumer, in proportion to ``weights`` (ranks), at least
    one core each; with fewer cores than consumers, shares are single cores reused round-robin."""
    cores = tuple(cores)
    if not weights or any(w < 1 for w in weights):
        raise ValueError(f"weights must be >= 1, got {weights}")
    if len(cores) < len(weights):
        log.warning("%d core(s) for %d compute processes: some share a core", len(cores), len(weights))
        return [(cores[i % len(cores)],) for i in range(len(weights))]
    total, shares, start = sum(weights), [], 0
    spare = len(cores) - len(weights)                     # cores beyond one per consumer
    extra = [spare * w // total for w in weights]
    for i in range(spare - sum(extra)):                   # leftovers to the heaviest consumers
        extra[sorted(range(len(weights)), key=lambda k: -weights[k])[i % len(weights)]] += 1
    for n in (1 + e for e in extra):
        shares.append(cores[start:start + n])
        start += n
    return shares


def _pin_process(cores) -> None:
    """Every thread of this process onto ``cores`` (Linux affinity is per thread; threads made
    later inherit from their creator, so the whole process stays there)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:                 # a thread that ended meanwhile
            continue


def pin(cores, threads: int = 0) -> int:
    """Pin this process (all its threads) to ``cores`` (no-op when empty) and set torch's intra-op threads to
    ``threads`` or, when 0, one per core; returns the thread count set (0 = left alone).
    Raises ``ValueError`` when asked for more threads than cores."""
    import torch

    if cores:
        if threads > len(cores):
            raise ValueError(f"{threads} torch threads asked for, but this rank has {len(cores)} core(s) "
                             f"({format_cpus(cores)}): lower --threads or give more --cpus")
        _pin_process(cores)
        threads = threads or len(cores)
    if threads:
        torch.set_num_threads(threads)
    return threads
