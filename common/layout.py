"""An instance's parallel layout and how it splits a model: KV heads per TP rank, layers per PP
stage, tokens per CP rank.

:class:`ParallelConfig` and pure functions shared by the engine (which shard a rank loads and
computes), the KV handoff (which shard a rank sends or receives) and the capacity planner
(which layouts can run), so all of them always agree. No torch.

Rank numbering inside an instance: prefill ``rank = cp_rank * tp + tp_rank``; decode
``rank = pp_rank * tp + tp_rank`` (tensor-parallel ranks of one stage are adjacent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.model import ModelConfig

Range = tuple[int, int]


def kv_head_range(tp_rank: int, tp: int, num_kv_heads: int) -> Range:
    """KV heads held by ``tp_rank``: a contiguous split when tp <= heads, else one replicated head.

    With ``tp > num_kv_heads`` (tp a multiple of the head count) rank ``i`` holds head
    ``i * num_kv_heads // tp``, so each head is replicated on ``tp / num_kv_heads`` ranks.
    """
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank={tp_rank} out of range for tp={tp}")
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ValueError(f"tp={tp} does not divide num_kv_heads={num_kv_heads}")
        per = num_kv_heads // tp
        return (tp_rank * per, (tp_rank + 1) * per)
    if tp % num_kv_heads:
        raise ValueError(f"tp={tp} is larger than num_kv_heads={num_kv_heads} but not a multiple of it")
    head = tp_rank * num_kv_heads // tp
    return (head, head + 1)


def layer_range(pp_rank: int, pp: int, num_layers: int) -> Range:
    """Contiguous layers of stage ``pp_rank``; the first ``num_layers % pp`` stages get one extra."""
    if pp > num_layers:
        raise ValueError(f"pp={pp} stages is more than num_layers={num_layers}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} out of range for pp={pp}")
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return (start, start + base + (1 if pp_rank < extra else 0))


def cp_token_ranges(cp_rank: int, cp: int, num_tokens: int) -> tuple[Range, ...]:
    """Token ranges of CP rank ``cp_rank``, balanced for causal attention.

    The prompt is cut into ``2 * cp`` near-equal chunks and rank ``j`` takes chunks ``j`` and
    ``2 * cp - 1 - j`` (one early, one late), so every rank does about the same attention work.
    With ``cp == 1`` this is the whole prompt.
    """
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} out of range for cp={cp}")
    if cp == 1:
        return ((0, num_tokens),)
    n = 2 * cp
    bounds = [num_tokens * i // n for i in range(n + 1)]
    first = (bounds[cp_rank], bounds[cp_rank + 1])
    second = (bounds[n - 1 - cp_rank], bounds[n - cp_rank])
    return tuple(r for r in (first, second) if r[0] < r[1])


def layout_problem(tp: int, pp: int, ep: int, num_heads: int, num_kv_heads: int, num_layers: int,
                   num_experts: int = 0) -> str | None:
    """Why a layout cannot split a model (the message quotes the values), or None when it can.

    The one statement of the split rules: :meth:`ParallelConfig.validate_for` raises
    it, and the capacity planner (``services.capacity``, which must not import torch) skips
    layouts that have one.
    """
    if num_heads % tp:
        return f"tp={tp} does not divide the {num_heads} attention heads"
    if tp > num_kv_heads and tp % num_kv_heads:
        return (f"tp={tp} exceeds num_kv_heads={num_kv_heads} but is not a multiple of it "
                f"(KV heads are replicated in whole groups)")
    if tp <= num_kv_heads and num_kv_heads % tp:
        return f"tp={tp} does not divide num_kv_heads={num_kv_heads}"
    if pp > num_layers:
        return f"pp={pp} stages is more than the model's {num_layers} layers"
    if ep > 1 and not num_experts:
        return f"ep={ep} needs a mixture-of-experts model; this one is dense"
    if num_experts and num_experts % ep:
        return f"ep={ep} does not divide the {num_experts} experts"
    return None


@dataclass(frozen=True)
class ParallelConfig:
    """Layout of one instance (see ``engine.parallel`` for the rank numbering).

    A pipeline stage has ``max(tp, ep)`` ranks: attention is tensor-parallel over groups of
    ``tp`` of them (replicated when ep > tp) and the MoE experts are split over groups of ``ep``
    (replicated when tp > ep), so EP adds no ranks of its own. Prefill instances use ``tp`` and
    ``cp`` (each CP rank a full TP group), decode instances ``tp``, ``pp`` and ``ep``.
    World size: ``pp * cp * max(tp, ep)``.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = sorted((self.tp, self.ep))
        if hi % lo:
            raise ValueError(f"tp={self.tp} and ep={self.ep}: the smaller must divide the larger "
                             f"(they share the ranks of a pipeline stage)")

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (and per CP rank)."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.pp * self.cp * self.stage_size

    def validate_for(self, model: ModelConfig, num_experts: int = 0) -> None:
        """Raise ValueError (quoting the values) when this layout cannot split ``model``."""
        problem = layout_problem(self.tp, self.pp, self.ep, model.num_heads, model.num_kv_heads,
                                 model.num_layers, num_experts)
        if problem:
            raise ValueError(problem)
