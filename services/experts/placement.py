"""Balancers: the placement of one MoE layer's experts for measured loads, all
``(loads [E] floats >= 0, ep, slots) -> engine.expert_placement.Placement``:

- :func:`greedy_placement` — the floor: every expert once, heaviest first onto the least
  loaded rank with a free slot; the redundant slots then copy the heaviest experts, one each.
- :func:`eplb_placement` — the reference: the global policy of DeepSeek's EPLB
  (https://github.com/deepseek-ai/EPLB, ``replicate_experts`` then ``balanced_packing``; one
  node, so its hierarchical variant reduces to this): each redundant slot goes to the expert
  with the largest per-copy load ``load / c``, then copies are packed heaviest first onto the
  least loaded rank that still has a free slot (our own implementation).
- :func:`balance` — what the rebalancer uses: the EPLB placement improved by a local search
  (move the heaviest copy off the hottest rank or swap it with a lighter one while the pair's
  maximum drops), and never worse than either of the two above (the best of the three is
  returned), so its hotspot ratio is at most the greedy floor's by construction.

Copies of one expert are kept on different ranks whenever a rank without that expert has a
free slot (two copies on one rank split nothing).
"""
from __future__ import annotations

from engine.expert_placement import Placement, check_loads

def _pack(weights: list[tuple[float, int]], ep: int, slots: int, num_experts: int) -> Placement:
    """LPT packing: copies ``(weight, expert)`` heaviest first onto the least loaded rank with a
    free slot, preferring ranks that do not hold the expert yet."""
    rank_load, rank_items = [0.0] * ep, [[] for _ in range(ep)]
    for w, e in sorted(weights, key=lambda we: (-we[0], we[1])):
        free = [r for r in range(ep) if len(rank_items[r]) < slots]
        fresh = [r for r in free if e not in rank_items[r]] or free
        r = min(fresh, key=lambda r: (rank_load[r], r))
        rank_load[r] += w
        rank_items[r].append(e)
    return Placement(num_experts, ep, slots, tuple(e for items in rank_items for e in sorted(items)))


def greedy_placement(loads, ep: int, slots: int) -> Placement:
    """The floor (module docstring): experts once each by LPT, then one copy each of the
    heaviest experts in the redundant slots."""
    e_count = len(loads)
    check_loads(loads, e_count)
    extra = ep * slots - e_count
    if extra < 0:
        raise ValueError(f"{ep}*{slots} slots cannot hold {e_count} experts")
    order = sorted(range(e_count), key=lambda e: (-float(loads[e]), e))
    copies = [1] * e_count
    for j in range(extra):
        copies[order[j % e_count]] += 1
    return _pack_by_copies(loads, copies, ep, slots)


def _pack_by_copies(loads, copies: list[int], ep: int, slots: int) -> Placement:
    weights = [(float(loads[e]) / c, e) for e, c in enumerate(copies) for _ in range(c)]
    return _pack(weights, ep, slots, len(loads))


def eplb_placement(loads, ep: int, slots: int) -> Placement:
    """The reference (DeepSeek EPLB's global policy, see the module docstring)."""
    e_count = len(loads)
    check_loads(loads, e_count)
    extra = ep * slots - e_count
    if extra < 0:
        raise ValueError(f"{ep}*{slots} slots cannot hold {e_count} experts")
    copies = [1] * e_count
    for _ in range(extra):
        # more copies than ranks split nothing further: prefer experts with fewer than ep
        e = max(range(e_count), key=lambda e: (copies[e] < ep, float(loads[e]) / copies[e], -e))
        copies[e] += 1
    return _pack_by_copies(loads, copies, ep, slots)


def _refine(p: Placement, loads, max_rounds: int = 200) -> Placement:
    """Local search on ``p``: move a copy off the hottest rank, or swap one with a lighter copy
    of another rank, while that lowers the larger of the two ranks' loads."""
    reps = p.replicas()
    w = [float(loads[e]) / reps[e] for e in range(p.num_experts)]
    ranks = [list(p.rank_experts(r)) for r in range(p.ep)]
    for _ in range(max_rounds):
        load = [sum(w[e] for e in items) for items in ranks]
        hot = max(range(p.ep), key=lambda r: load[r])
        best = None                                 # (new pair max, other rank, i, j)
        for other in range(p.ep):
            if other == hot:
                continue
            for i, a in enumerate(ranks[hot]):
                for j, b in enumerate(ranks[other]):
                    if a == b or (b in ranks[hot] and b != a) or (a in ranks[other]):
                        continue
                    new_max = max(load[hot] - w[a] + w[b], load[other] - w[b] + w[a])
                    if new_max < load[hot] - 1e-9 and (best is None or new_max < best[0]):
                        best = (new_max, other, i, j)
        if best is None:
            break
        _, other, i, j = best
        ranks[hot][i], ranks[other][j] = ranks[other][j], ranks[hot][i]
    return Placement(p.num_experts, p.ep, p.slots, tuple(e for items in ranks for e in sorted(items)))


def balance(loads, ep: int, slots: int) -> Placement:
    """The rebalancer's placement for ``loads [E]`` (tokens per logical expert over the
    window) on ``ep`` ranks of ``slots`` slots: the lowest hotspot ratio of the greedy floor,
    the EPLB reference and the refined EPLB placement (ties: the refined one). ValueError on
    negative loads or fewer slots than experts."""
    candidates = [_refine(eplb_placement(loads, ep, slots), loads),
                  eplb_placement(loads, ep, slots), greedy_placement(loads, ep, slots)]
    return min(candidates, key=lambda p: p.hotspot(loads))


