"""Ring attention across gloo CP ranks equals single-process causal attention.

Each rank of ``spawn_ranks`` takes its zigzag chunks (``common.layout.cp_token_ranges``) of
one random prompt, runs ``kernels.ring_attention.ring_prefill_attention`` over its CP group,
and returns its outputs; the parent scatters them back by position and compares with
``kernels.prefill_attention`` over the whole prompt, within ``tests.tolerances`` (the ring
merges partial softmaxes in another order than one SDPA call). One spawn per layout covers every case
(prompt lengths, GQA ratios) so the suite pays the process start-up only once per layout.
"""
from __future__ import annotations

import pytest
import torch

from common.layout import ParallelConfig, cp_token_ranges
from engine.parallel import ParallelGroups, Group
from engine.runtime.spawn import spawn_ranks
from kernels import prefill_attention
from kernels.ring_attention import masked_block_attention, ring_prefill_attention
from tests.tolerances import assert_close, attention_length

HEAD_DIM = 8
KV_HEADS = 2
# (prompt length, query heads per kv head): 37 is not a multiple of 2*cp; 1 leaves ranks empty.
CASES = [(37, 1), (37, 4), (1, 1), (1, 4), (5, 4), (64, 2)]


def make_inputs(num_tokens: int, group: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, KV_HEADS * group, HEAD_DIM, generator=g)
    k = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=g)
    return q, k, v


def local_positions(cp_rank: int, cp: int, num_tokens: int) -> torch.Tensor:
    ranges = cp_token_ranges(cp_rank, cp, num_tokens)
    return torch.cat([torch.arange(a, b) for a, b in ranges] or [torch.zeros(0, dtype=torch.long)])


def run_cases(groups: ParallelGroups) -> list[tuple[list, list]]:
    """On one rank: ring attention for every case; returns (positions, out) per case as lists.

    Plain lists, not tensors: a tensor put on the result queue is shared through a file
    descriptor that vanishes when the rank process exits before the parent reads it."""
    results = []
    for i, (num_tokens, group) in enumerate(CASES):
        q, k, v = make_inputs(num_tokens, group, seed=i)
        pos = local_positions(groups.cp_rank, groups.cp.size, num_tokens)
        out = ring_prefill_attention(q[pos], k[pos], v[pos], pos, groups.cp, HEAD_DIM ** -0.5)
        results.append((pos.tolist(), out.tolist()))
    return results


def reference(num_tokens: int, group: int, seed: int) -> torch.Tensor:
    q, k, v = make_inputs(num_tokens, group, seed)
    return prefill_attention(q, k, v, torch.tensor([0, num_tokens], dtype=torch.int32), HEAD_DIM ** -0.5)


def ring_k(num_tokens: int, cp: int) -> int:
    """Reduction length of a ring output: the attention's, plus merging ``2 cp`` partials."""
    return attention_length(HEAD_DIM, num_tokens) + 2 * cp


def check_layout(layout: ParallelConfig, per_rank: list) -> None:
    """Every CP group (one per tp_rank) must reassemble the single-process output."""
    for tp_rank in range(layout.tp):
        ranks = [cp_rank * layout.tp + tp_rank for cp_rank in range(layout.cp)]
        for i, (num_tokens, group) in enumerate(CASES):
            want = reference(num_tokens, group, seed=i)
            got = torch.full_like(want, float("nan"))
            for r in ranks:
                pos, out = per_rank[r][i]
                got[pos] = torch.tensor(out).reshape(len(pos), *want.shape[1:])
            assert_close(got, want, k=ring_k(num_tokens, layout.cp), msg=f"layout {layout} case {CASES[i]}")


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cp,tp", [(2, 1), (4, 1), (2, 2)])
def test_ring_attention_matches_full_causal(cp: int, tp: int) -> None:
    layout = ParallelConfig(tp=tp, cp=cp)
    check_layout(layout, spawn_ranks(layout, run_cases, timeout_s=100))


@pytest.mark.unit
def test_ring_attention_single_rank_is_causal_attention() -> None:
    for i, (num_tokens, group) in enumerate(CASES):
        q, k, v = make_inputs(num_tokens, group, seed=i)
        out = ring_prefill_attention(q, k, v, torch.arange(num_tokens), Group.solo(), HEAD_DIM ** -0.5)
        assert_close(out, reference(num_tokens, group, seed=i), k=ring_k(num_tokens, 1))


@pytest.mark.unit
def test_masked_block_with_no_visible_key_contributes_nothing() -> None:
    q, k, v = make_inputs(4, 2, seed=0)
    out, lse = masked_block_attention(q, k, v, torch.arange(4), torch.arange(10, 14), 0.5)
    # exact by construction (no key contributes), not a comparison of two paths
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


@pytest.mark.unit
def test_ring_attention_rejects_bad_shapes() -> None:
    q, k, v = make_inputs(4, 2, seed=0)
    with pytest.raises(ValueError, match="positions"):
        ring_prefill_attention(q, k, v, torch.arange(3), Group.solo(), 0.5)
    with pytest.raises(ValueError, match="multiple"):
        ring_prefill_attention(q[:, :3], k, v, torch.arange(4), Group.solo(), 0.5)
