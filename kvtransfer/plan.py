"""The reshard plan: which KV pieces move from which prefill rank to which decode rank.

A pure function of the two layouts (DESIGN §5). Each side is described rank by rank:

* a source (prefill) rank holds, for **all layers**, KV heads ``heads`` for the token ranges
  ``tokens`` (its context-parallel chunks);
* a destination (decode) rank needs KV heads ``heads`` for layers ``layers`` and all tokens.

The plan is every non-empty intersection, one :class:`Piece` each. When several source ranks
hold the same head (tensor parallelism beyond the KV-head count replicates heads), each
(head, token range) is taken from exactly one of them: the first in rank order.
"""
from __future__ import annotations

from dataclasses import dataclass

Range = tuple[int, int]  # [start, end)


@dataclass(frozen=True)
class SourceRank:
    rank: int
    heads: Range
    tokens: tuple[Range, ...]


@dataclass(frozen=True)
class DestRank:
    rank: int
    layers: Range
    heads: Range


@dataclass(frozen=True)
class Piece:
    """``layers`` x ``heads`` x ``tokens`` of KV, sent from ``src`` to ``dst`` as one message."""

    src: int
    dst: int
    layers: Range
    heads: Range
    tokens: Range


def _overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _owned_heads(sources: list[SourceRank]) -> dict[tuple[int, Range], Range]:
    """For each (source rank, token range) the head range it is the chosen source of."""
    owned: dict[tuple[int, Range], Range] = {}
    taken: dict[Range, set[int]] = {}  # token range -> heads already given a source
    for src in sorted(sources, key=lambda s: s.rank):
        for tok in src.tokens:
            seen = taken.setdefault(tok, set())
            mine = [h for h in range(*src.heads) if h not in seen]
            seen.update(mine)
            if mine:
                if mine != list(range(mine[0], mine[-1] + 1)):
                    raise ValueError(f"source rank {src.rank} would own non-contiguous heads {mine}")
                owned[(src.rank, tok)] = (mine[0], mine[-1] + 1)
    return owned


def plan_pieces(sources: list[SourceRank], dests: list[DestRank]) -> list[Piece]:
    """All pieces to move so every destination gets each (layer, head, token) it needs once."""
    owned = _owned_heads(sources)
    pieces = []
    for dst in sorted(dests, key=lambda d: d.rank):
        for (src_rank, tok), heads in sorted(owned.items()):
            h = _overlap(heads, dst.heads)
            if h is not None and tok[0] < tok[1]:
                pieces.append(Piece(src=src_rank, dst=dst.rank, layers=dst.layers, heads=h, tokens=tok))
    return pieces


def single_rank_plan(num_layers: int, num_kv_heads: int, num_tokens: int) -> list[Piece]:
    """The plan between two one-rank instances: everything in one piece."""
    return plan_pieces([SourceRank(0, (0, num_kv_heads), ((0, num_tokens),))],
                       [DestRank(0, (0, num_layers), (0, num_kv_heads))])
