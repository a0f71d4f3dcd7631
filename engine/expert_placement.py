"""Expert placement, the engine's side of expert-parallel load balancing: where each MoE
layer's experts live on the EP ranks.

A :class:`Placement` maps the ``ep * slots`` *physical* expert slots of one MoE layer to its
``E`` *logical* experts: slot ``i`` lives on EP rank ``i // slots`` and holds logical expert
``phys_to_log[i]``. ``ep * slots - E`` slots are redundant (``--redundant-experts R``): they
hold extra copies of hot experts. Tokens routed to an expert with ``c`` copies are split
round-robin over the copies (``engine.moe.MoEBlock.forward``: the ``i``-th (token, expert) pair
of step ``s`` goes to copy ``(i + s) % c``), so a copy carries ``load / c`` of its expert's
tokens, even at one token per step.

Load view: the load of EP rank ``r`` is ``sum_{slots i on r} load[phys_to_log[i]] / c``; the
*hotspot ratio* is ``max_r load_r / mean_r load_r`` (1.0 = perfectly balanced; with EP the
hottest rank sets the pace of every MoE layer, so 2.0 halves the layer's throughput).

The engine holds and applies placements (``engine.moe``, ``engine.expert_move``); which
placement to choose, from which statistics, is ``services.experts`` (the balancers are in
``services.experts.placement``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """One MoE layer's slot table (see the module docstring). Validated on construction:
    ValueError when ``len(phys_to_log) != ep * slots``, an id is outside ``[0, E)`` or an
    expert has no slot."""

    num_experts: int
    ep: int
    slots: int                       # physical slots per EP rank
    phys_to_log: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.ep < 1 or self.slots < 1:
            raise ValueError(f"placement needs num_experts, ep and slots >= 1, got "
                             f"{self.num_experts}, {self.ep}, {self.slots}")
        if len(self.phys_to_log) != self.ep * self.slots:
            raise ValueError(f"placement has {len(self.phys_to_log)} slots, expected ep*slots = "
                             f"{self.ep}*{self.slots}")
        bad = [e for e in self.phys_to_log if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"placement names experts {bad[:5]} outside [0, {self.num_experts})")
        missing = sorted(set(range(self.num_experts)) - set(self.phys_to_log))
        if missing:
            raise ValueError(f"placement leaves experts {missing[:5]} without a slot")

    def rank_experts(self, rank: int) -> tuple[int, ...]:
        """Logical experts in EP rank ``rank``'s slots, in slot order."""
        return self.phys_to_log[rank * self.slots:(rank + 1) * self.slots]

    def replicas(self) -> list[int]:
        """Copies per logical expert, ``[E]`` ints >= 1."""
        out = [0] * self.num_experts
        for e in self.phys_to_log:
            out[e] += 1
        return out

    def copy_index(self) -> list[int]:
        """Per physical slot, which copy of its expert it is (0-based, in slot order)."""
        seen = [0] * self.num_experts
        out = []
        for e in self.phys_to_log:
            out.append(seen[e])
            seen[e] += 1
        return out

    def rank_loads(self, loads) -> list[float]:
        """Tokens per EP rank when ``loads [E]`` tokens are routed to the logical experts."""
        check_loads(loads, self.num_experts)
        reps = self.replicas()
        out = [0.0] * self.ep
        for i, e in enumerate(self.phys_to_log):
            out[i // self.slots] += float(loads[e]) / reps[e]
        return out

    def hotspot(self, loads) -> float:
        """``max / mean`` of :meth:`rank_loads` (1.0 when there is no load)."""
        return hotspot_ratio(self.rank_loads(loads))

    def to_list(self) -> list[int]:
        return list(self.phys_to_log)

    @staticmethod
    def from_list(slots_table, num_experts: int, ep: int) -> "Placement":
        table = tuple(int(e) for e in slots_table)
        if len(table) % ep:
            raise ValueError(f"a placement of {len(table)} slots does not split over ep={ep}")
        return Placement(num_experts, ep, len(table) // ep, table)


def hotspot_ratio(rank_loads) -> float:
    """``max / mean`` of per-rank loads; 1.0 for no load."""
    total = float(sum(rank_loads))
    return max(rank_loads) * len(rank_loads) / total if total > 0 else 1.0


def slots_per_rank(num_experts: int, ep: int, redundant: int) -> int:
    """Physical slots per EP rank for ``E`` experts and ``R`` redundant slots; ValueError when
    ``ep`` does not divide ``E + R`` or ``R < 0``."""
    if redundant < 0:
        raise ValueError(f"redundant experts must be >= 0, got {redundant}")
    if (num_experts + redundant) % ep:
        raise ValueError(f"ep={ep} must divide num_experts + redundant experts = "
                         f"{num_experts} + {redundant}; choose --redundant-experts as a multiple of {ep} "
                         f"(when ep divides {num_experts})")
    return (num_experts + redundant) // ep


def default_placement(num_experts: int, ep: int, redundant: int = 0) -> Placement:
    """Slot ``i`` holds expert ``i % E``: with ``R = 0`` rank ``r`` owns the contiguous experts
    ``[r*E/ep, (r+1)*E/ep)`` (the layout without a balancer); the ``R`` redundant slots copy
    experts ``0..R-1``."""
    slots = slots_per_rank(num_experts, ep, redundant)
    return Placement(num_experts, ep, slots, tuple(i % num_experts for i in range(ep * slots)))


def check_loads(loads, num_experts: int) -> None:
    if len(loads) != num_experts:
        raise ValueError(f"{len(loads)} expert loads for {num_experts} experts")
    if any(float(x) < 0 for x in loads):
        raise ValueError(f"expert loads must be >= 0, got {list(loads)[:8]}")


def placements_to_json(placements: dict[int, Placement]) -> str:
    """``{layer: [slot table]}`` as JSON (the ``layers`` field of the Redis placement hash)."""
    return json.dumps({str(layer): p.to_list() for layer, p in sorted(placements.items())})


def placements_from_json(text: str, num_experts: int, ep: int) -> dict[int, Placement]:
    """Inverse of :func:`placements_to_json`; ValueError on a malformed table."""
    try:
        raw = json.loads(text)
        return {int(layer): Placement.from_list(table, num_experts, ep) for layer, table in raw.items()}
    except (TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed placement table: {exc}") from None
