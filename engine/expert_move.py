"""Live expert re-placement: move expert weights between the EP ranks of a running instance.

Who calls what: every rank of an instance runs :func:`apply_placement` on its model's MoE blocks
for the same command of the instance's command channel (``services.instance``), between two
forward steps, so every rank switches its routing table at the same step. Each EP group (one
per pipeline stage, and per TP replica when ``tp > ep``) exchanges only among its own ranks.

Plan (computed identically on every rank from the old and the new placement, so no
negotiation is needed): for each rank ``d`` and each logical expert ``e`` that ``d`` holds in the
new placement but not in the old one, one transfer ``(s, d, e)`` from a rank ``s`` that held
``e`` before, choosing among the old holders the one with the fewest sends so far (ties: the
lowest rank). Experts a rank keeps are copied locally. Each transfer is one message of
``3 * I * H`` weights (``W1; W3`` and ``W2``), tagged ``layer * E + e``; all sends and receives
of all layers are posted at once (``isend``/``irecv``) and then awaited, so the exchange
cannot deadlock.

Memory: while switching, a rank holds its old and its new slot weights of every layer of its
stage (``(S_old + S_new) * 3 * I * H`` elements per layer); the old ones are freed on return.
"""
from __future__ import annotations

import time

import torch

from engine.expert_placement import Placement


def plan_moves(old: Placement, new: Placement) -> list[tuple[int, int, int]]:
    """``(source rank, destination rank, expert)`` transfers that turn ``old`` into ``new``
    (EP-group ranks). ValueError when the two are for different experts or ep."""
    if (old.num_experts, old.ep) != (new.num_experts, new.ep):
        raise ValueError(f"cannot move from a placement of {old.num_experts} experts over ep={old.ep} "
                         f"to one of {new.num_experts} over ep={new.ep}")
    holders = {e: sorted({r for r in range(old.ep) if e in old.rank_experts(r)})
               for e in range(old.num_experts)}
    sends = [0] * old.ep
    moves = []
    for d in range(new.ep):
        had = set(old.rank_experts(d))
        for e in sorted(set(new.rank_experts(d)) - had):
            s = min(holders[e], key=lambda r: (sends[r], r))
            sends[s] += 1
            moves.append((s, d, e))
    return moves


def apply_placement(blocks: dict, placements: dict[int, Placement]) -> dict:
    """Switch the MoE blocks of this rank (``{global layer: MoEBlock}``) to ``placements``
    (``{layer: Placement}``; layers of other stages are ignored, a missing layer raises
    ValueError). Collective over each block's EP group: every rank of the group must call it
    with the same placements. Returns ``{"moved": transfers this rank took part in,
    "bytes_sent", "bytes_received", "seconds", "slots"}``."""
    missing = sorted(set(blocks) - set(placements))
    if missing:
        raise ValueError(f"the new placement has no table for layers {missing}")
    started = time.perf_counter()
    pending, landed, staged = [], [], []
    sent = received = moved = 0
    for layer, block in sorted(blocks.items()):
        old, new, group = block.placement, placements[layer], block.ep
        if (new.num_experts, new.ep) != (block.num_experts, group.size):
            raise ValueError(f"layer {layer}: placement of {new.num_experts} experts over ep={new.ep}, "
                             f"the instance has {block.num_experts} over ep={group.size}")
        me = group.rank
        gate_up = block.gate_up_proj.new_empty((new.slots, *block.gate_up_proj.shape[1:]))
        down = block.down_proj.new_empty((new.slots, *block.down_proj.shape[1:]))
        old_local = {e: s for s, e in enumerate(block.slot_experts)}
        for s, e in enumerate(new.rank_experts(me)):
            if e in old_local:
                gate_up[s].copy_(block.gate_up_proj[old_local[e]])
                down[s].copy_(block.down_proj[old_local[e]])
        for src, dst, e in plan_moves(old, new):
            tag = layer * block.num_experts + e
            if src == me:
                msg = _pack(block.gate_up_proj[old_local[e]], block.down_proj[old_local[e]])
                pending.append(group.isend(msg, dst, tag))
                sent += msg.numel() * msg.element_size()
                moved += 1
            elif dst == me:
                msg = torch.empty(gate_up[0].numel() + down[0].numel(), dtype=gate_up.dtype,
                                  device=gate_up.device)
                pending.append(group.irecv(msg, src, tag))
                landed.append((msg, e, gate_up, down, new.rank_experts(me)))
                received += msg.numel() * msg.element_size()
                moved += 1
        staged.append((block, new, gate_up, down))
    for work in pending:
        work.wait()
    for msg, e, gate_up, down, slot_experts in landed:
        for s in (s for s, x in enumerate(slot_experts) if x == e):
            gate_up[s].copy_(msg[:gate_up[s].numel()].view_as(gate_up[s]))
            down[s].copy_(msg[gate_up[s].numel():].view_as(down[s]))
    for block, new, gate_up, down in staged:
        block.set_slots(new, gate_up, down)
    return {"moved": moved, "bytes_sent": sent, "bytes_received": received,
            "seconds": time.perf_counter() - started,
            "slots": max((new.slots for _, new, _, _ in staged), default=0)}


def _pack(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate_up.reshape(-1), down.reshape(-1)])
