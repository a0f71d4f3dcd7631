"""Collective algorithms, their alpha-beta times, and the choice NCCL/RCCL make between them.

Every time is ``steps x alpha + bytes on the busiest link / bandwidth`` (Hockney's alpha-beta
model). Notation: ``n`` ranks; ``S`` bytes per rank (what each contributes to an all-reduce,
what each sends in all in an all-to-all); ``a`` seconds per step; bandwidths in bytes/s per
direction, taken from a :class:`Fabric`, the part of a node's interconnect a group of ranks
sees (``services.capacity.hardware.Hardware.fabric`` builds it from the profile's topology):

- ``ring_bw``: what one rank feeds its ring successor while every rank does. A switch (NVSwitch)
  gives a GPU its whole link bandwidth towards any peer. In a full mesh (AMD Infinity Fabric)
  one link joins two GPUs, and NCCL/RCCL run one ring per channel over edge-disjoint rings of
  the group (the complete digraph on n nodes splits into n - 1 directed Hamiltonian cycles,
  n != 4, 6: Tillson, J. Comb. Theory B 29, 1980), so a group of n uses its n - 1 links:
  a 2-GPU ring has one link, an 8-GPU ring all seven.
- ``peer_bw``: one rank to one peer (send/recv): a switch's whole bandwidth, a mesh's one link.
- ``fanout_bw``: one rank exchanging with all n - 1 peers at once (direct algorithms): a
  switch's whole bandwidth, a mesh's n - 1 links together.

Algorithms (the ones NCCL/RCCL choose between for these ops):

============  ======================================  ===========================================
op, name      seconds                                 source
============  ======================================  ===========================================
all_reduce    2(n-1) a + 2(n-1)/n S / ring_bw         Patarasuk & Yuan, "Bandwidth optimal
 ring                                                 all-reduce algorithms for clusters of
                                                      workstations", JPDC 69(2), 2009; NCCL docs,
                                                      "Performance reported by NCCL tests":
                                                      busBw = algBw x 2(n-1)/n
all_reduce    2 ceil(log2 n) a + 2 S / ring_bw        double binary tree: Sanders, Speck & Traff,
 tree                                                 Parallel Computing 35(12), 2009; NCCL 2.4
                                                      (NVIDIA blog "Massively Scale Your Deep
                                                      Learning Training with NCCL 2.4", 2019)
                                                      builds trees across nodes and a chain inside
                                                      one, so only a group crossing nodes has it
all_reduce    a + (n-1) S / fanout_bw                 each rank reads every peer's whole buffer
 one_shot                                             over load/store links and reduces locally:
                                                      vLLM ``custom_all_reduce.cuh``, TensorRT-LLM
                                                      one-shot all-reduce; inside a node only
all_to_all    a + (n-1)/n S / fanout_bw               S/n to every peer at once: NCCL docs,
 direct                                               "Point-to-point communication" (all-to-all
                                                      as grouped ncclSend/ncclRecv)
send_recv     a + S / peer_bw                         Hockney 1994
 p2p
============  ======================================  ===========================================

The choice (:func:`best`): NCCL's tuner predicts each algorithm's time from such a latency +
bytes / bandwidth model and runs the fastest (NCCL docs, ``NCCL_ALGO``; ``src/graph/tuning.cc``),
so small messages take the one-shot (latency: one step), large ones the ring (bandwidth: each
byte crosses a link ``2(n-1)/n`` times), and groups across nodes the tree (latency ``log n``).
Not modelled: NVLink SHARP (NVLS: in-switch reduction on H100/B200 NVSwitch), LL/LL128
protocol variants, the one-shot's local reduction reads (HBM-bound, small at its sizes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

OPS = ("all_reduce", "all_to_all", "send_recv")
ALGORITHMS = {"all_reduce": ("ring", "tree", "one_shot"), "all_to_all": ("direct",), "send_recv": ("p2p",)}


@dataclass(frozen=True)
class Fabric:
    """What a group of ranks sees of the interconnect: bytes/s per direction and seconds per step.

    ``load_store``: peers' memory is mapped (NVLink/xGMI P2P inside a node): one-shot allowed.
    ``crosses_node``: the group spans nodes (its bytes go through NICs): tree allowed.
    """

    ring_bw: float
    peer_bw: float
    fanout_bw: float
    alpha_s: float
    load_store: bool = True
    crosses_node: bool = False

    def __post_init__(self) -> None:
        for name in ("ring_bw", "peer_bw", "fanout_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fabric {name} must be positive bytes/s, got {getattr(self, name)}")
        if self.alpha_s < 0:
            raise ValueError(f"fabric alpha_s must be >= 0 seconds, got {self.alpha_s}")


def available(op: str, fabric: Fabric) -> tuple[str, ...]:
    """The algorithms of ``op`` this fabric can run (tree across nodes, one-shot inside one)."""
    if op not in ALGORITHMS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return tuple(a for a in ALGORITHMS[op] if not (a == "tree" and not fabric.crosses_node)
                 and not (a == "one_shot" and not fabric.load_store))


def terms(op: str, algorithm: str, ranks: int) -> tuple[float, float]:
    """``(latency steps, bytes factor)`` of an algorithm: its time is ``steps x alpha + factor x
    S / bw`` with ``bw`` the fabric figure :func:`bandwidth` names (see the module table)."""
    n = ranks
    table = {("all_reduce", "ring"): (2 * (n - 1), 2 * (n - 1) / n),
             ("all_reduce", "tree"): (2 * math.ceil(math.log2(n)), 2.0),
             ("all_reduce", "one_shot"): (1, n - 1),
             ("all_to_all", "direct"): (1, (n - 1) / n),
             ("send_recv", "p2p"): (1, 1.0)}
    if (op, algorithm) not in table:
        raise ValueError(f"no algorithm {algorithm!r} for {op!r}; known: {sorted(table)}")
    return table[op, algorithm]


def bandwidth(op: str, algorithm: str, fabric: Fabric) -> float:
    """The fabric figure an algorithm's bytes move at (module doc)."""
    if op == "send_recv":
        return fabric.peer_bw
    return fabric.ring_bw if algorithm in ("ring", "tree") else fabric.fanout_bw


def time_of(op: str, algorithm: str, nbytes: float, ranks: int, fabric: Fabric) -> float:
    """Seconds of one ``op`` of ``nbytes`` per rank over ``ranks`` ranks by ``algorithm``; 0 for
    one rank or no bytes."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    steps, factor = terms(op, algorithm, ranks)
    return steps * fabric.alpha_s + factor * nbytes / bandwidth(op, algorithm, fabric)


def best(op: str, nbytes: float, ranks: int, fabric: Fabric) -> tuple[float, str]:
    """``(seconds, algorithm)`` of the fastest algorithm this fabric allows, as NCCL's tuner picks."""
    return min((time_of(op, a, nbytes, ranks, fabric), a) for a in available(op, fabric))


# ---- fitting the alpha-beta terms to measured times (the calibrated ``local`` profile) ----------

GLOO_ALGORITHM = {"all_reduce": "ring", "all_to_all": "direct", "send_recv": "p2p"}
"""What gloo runs for each op (``gloo/allreduce.cc``: ring unless BCUBE is asked; ``alltoall``
posts every peer's send and receive at once; send/recv is a pair)."""


def fit_alpha_beta(measured: dict) -> tuple[float, float]:
    """``(alpha seconds, bandwidth bytes/s)`` that best explain ``{op: {ranks: [[bytes, s], ...]}}``
    with the algorithm gloo runs per op (:data:`GLOO_ALGORITHM`) on a switch-like fabric (every
    peer at the same bandwidth): least squares of the relative error, both terms >= 0."""
    rows = []
    for op, by_ranks in measured.items():
        for n, pts in by_ranks.items():
            steps, factor = terms(op, GLOO_ALGORITHM[op], int(n))
            rows += [(steps / t, factor * b / t) for b, t in pts if t > 0]
    if not rows:
        raise ValueError("no measured collective times to fit")
    saa = sum(a * a for a, _ in rows)
    sbb = sum(b * b for _, b in rows)
    sab = sum(a * b for a, b in rows)
    sa, sb = sum(a for a, _ in rows), sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha, inv_bw = ((sa * sbb - sb * sab) / det, (sb * saa - sa * sab) / det) if det else (-1.0, -1.0)
    if alpha < 0:                                 # a negative term: fit the other one alone
        alpha, inv_bw = 0.0, sb / sbb
    elif inv_bw <= 0:
        alpha, inv_bw = sa / saa, 0.0
    return alpha, 1.0 / max(inv_bw, 1e-15)


def fit_errors(measured: dict, alpha_s: float, bw: float) -> list[dict]:
    """Per op, rank count and size: measured seconds, the fitted formula's, relative error."""
    fabric = Fabric(ring_bw=bw, peer_bw=bw, fanout_bw=bw, alpha_s=alpha_s)
    out = []
    for op, by_ranks in measured.items():
        for n, pts in sorted(by_ranks.items(), key=lambda kv: int(kv[0])):
            for nbytes, t in pts:
                model = time_of(op, GLOO_ALGORITHM[op], nbytes, int(n), fabric)
                out.append({"op": op, "ranks": int(n), "bytes": nbytes, "measured_s": t, "model_s": model,
                            "error": (model - t) / t if t > 0 else 0.0})
    return out
