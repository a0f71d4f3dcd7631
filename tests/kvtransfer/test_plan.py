"""The reshard plan between a prefill layout (tp x cp) and a decode layout (tp x pp), exhaustively.

Covers ``common/layout.py`` (how each layout splits heads, layers and tokens),
``kvtransfer/plan.py`` and ``kvtransfer/handoff.transfer_plan`` for every pair of layouts with
up to four ranks a side, over several model shapes and prompt lengths.
"""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from cleave.v1.inference_pb2 import Layout
from common.layout import cp_token_ranges, kv_head_range, layer_range
from common.model import ModelConfig
from kvtransfer.handoff import transfer_plan
from kvtransfer.plan import DestRank, Piece, SourceRank, plan_pieces, single_rank_plan

pytestmark = pytest.mark.unit

MAX_RANKS = 4
PAIRS = [(a, b) for a in range(1, MAX_RANKS + 1) for b in range(1, MAX_RANKS + 1) if a * b <= MAX_RANKS]
SHAPES = list(itertools.product((3, 4, 5), (1, 2, 4)))   # (num_layers, num_kv_heads)
TOKENS = (1, 7, 16)


def _model(num_layers: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, num_layers=num_layers,
                       num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, intermediate_size=64,
                       rope_theta=10000.0, rms_norm_eps=1e-5, max_position=64,
                       tie_word_embeddings=False)


def _tp_ok(tp: int, heads: int) -> bool:
    return heads % tp == 0 if tp <= heads else tp % heads == 0


def _expand(piece: Piece):
    return itertools.product(range(*piece.layers), range(*piece.heads), range(*piece.tokens))


def _check_plan(src_tp, cp, dst_tp, pp, layers, heads, tokens):
    plan = transfer_plan(Layout(tp=src_tp, cp=cp), Layout(tp=dst_tp, pp=pp), _model(layers, heads), tokens)
    # what each source rank holds (rank = cp_rank * tp + tp_rank), all layers
    held = {}
    for c, t in itertools.product(range(cp), range(src_tp)):
        hs = kv_head_range(t, src_tp, heads)
        held[c * src_tp + t] = {(h, tok) for h in range(*hs)
                                for r in cp_token_ranges(c, cp, tokens) for tok in range(*r)}
    # what each decode rank needs (rank = pp_rank * tp + tp_rank), all tokens
    needed = {}
    for p, t in itertools.product(range(pp), range(dst_tp)):
        needed[p * dst_tp + t] = set(itertools.product(range(*layer_range(p, pp, layers)),
                                                       range(*kv_head_range(t, dst_tp, heads)),
                                                       range(tokens)))
    delivered = {d: Counter() for d in needed}
    for piece in plan:
        for lo, hi in (piece.layers, piece.heads, piece.tokens):
            assert lo < hi, f"empty range in {piece}"
        assert 0 <= piece.layers[0] and piece.layers[1] <= layers
        assert piece.src in held, f"{piece} names a prefill rank that does not exist"
        assert piece.dst in needed, f"{piece} names a decode rank that does not exist"
        missing = {(h, t) for h in range(*piece.heads) for t in range(*piece.tokens)} - held[piece.src]
        assert not missing, f"{piece}: source does not hold {sorted(missing)[:4]}"
        delivered[piece.dst].update(_expand(piece))
    for d, want in needed.items():
        got = delivered[d]
        twice = [k for k, n in got.items() if n > 1]
        assert not twice, f"decode rank {d} gets {twice[:4]} more than once"
        assert set(got) == want, (f"decode rank {d}: missing {sorted(want - set(got))[:4]}, "
                                  f"unwanted {sorted(set(got) - want)[:4]}")
    return plan


@pytest.mark.parametrize("layers,heads", SHAPES)
def test_every_layout_pair_delivers_exactly_what_is_needed(layers, heads):
    checked = rejected = 0
    for (src_tp, cp), (dst_tp, pp), tokens in itertools.product(PAIRS, PAIRS, TOKENS):
        if not (_tp_ok(src_tp, heads) and _tp_ok(dst_tp, heads)) or pp > layers:
            with pytest.raises(ValueError, match=r"tp=\d|pp=\d"):
                transfer_plan(Layout(tp=src_tp, cp=cp), Layout(tp=dst_tp, pp=pp), _model(layers, heads), tokens)
            rejected += 1
            continue
        _check_plan(src_tp, cp, dst_tp, pp, layers, heads, tokens)
        checked += 1
    assert checked > 0
    # tp=3 only fits one KV head; pp=4 does not fit 3 layers
    assert (rejected > 0) == (heads > 1 or layers < MAX_RANKS)


def test_gqa_replication_takes_each_head_from_the_first_rank_holding_it():
    # prefill tp=4 over 2 KV heads: ranks 0,1 hold head 0 and ranks 2,3 hold head 1
    plan = _check_plan(4, 1, 1, 1, layers=3, heads=2, tokens=5)
    assert sorted((p.src, p.heads) for p in plan) == [(0, (0, 1)), (2, (1, 2))]
    # and with cp=... the choice is per token range, never across CP ranks
    plan = _check_plan(2, 2, 2, 2, layers=4, heads=1, tokens=8)
    assert {p.src for p in plan} == {0, 2}   # tp rank 0 of each cp rank
    # decode tp beyond the head count: both replicas of a head get it
    plan = _check_plan(1, 1, 4, 1, layers=3, heads=2, tokens=3)
    assert sorted((p.dst, p.heads) for p in plan) == [(0, (0, 1)), (1, (0, 1)), (2, (1, 2)), (3, (1, 2))]


def test_uneven_pp_split_sends_each_stage_its_layers():
    plan = _check_plan(1, 1, 1, 3, layers=5, heads=2, tokens=4)
    assert sorted((p.dst, p.layers) for p in plan) == [(0, (0, 2)), (1, (2, 4)), (2, (4, 5))]


def test_one_rank_each_is_one_piece():
    assert single_rank_plan(3, 2, 7) == [Piece(src=0, dst=0, layers=(0, 3), heads=(0, 2), tokens=(0, 7))]
    plan = transfer_plan(Layout(), Layout(), _model(3, 2), 7)   # unset (0) fields mean 1
    assert plan == single_rank_plan(3, 2, 7)


def test_plan_pieces_rejects_non_contiguous_ownership():
    sources = [SourceRank(0, (1, 2), ((0, 4),)), SourceRank(1, (0, 3), ((0, 4),))]
    with pytest.raises(ValueError, match=r"source rank 1 would own non-contiguous heads \[0, 2\]"):
        plan_pieces(sources, [DestRank(0, (0, 1), (0, 3))])


# ---- common/layout.py ----------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("tp", range(1, 9))
def test_kv_head_range_splits_or_replicates(tp, heads):
    if not _tp_ok(tp, heads):
        why = "does not divide" if tp <= heads else "is larger than"
        with pytest.raises(ValueError, match=f"tp={tp} {why} num_kv_heads={heads}"):
            kv_head_range(0, tp, heads)
        return
    ranges = [kv_head_range(r, tp, heads) for r in range(tp)]
    holders = Counter(h for lo, hi in ranges for h in range(lo, hi))
    assert set(holders) == set(range(heads))
    assert set(holders.values()) == {max(1, tp // heads)}     # each head on tp/heads ranks
    assert all(hi - lo == max(1, heads // tp) for lo, hi in ranges)
    assert ranges == sorted(ranges)                           # adjacent ranks, adjacent heads


def test_kv_head_range_error_messages():
    with pytest.raises(ValueError, match="tp=3 does not divide num_kv_heads=4"):
        kv_head_range(0, 3, 4)
    with pytest.raises(ValueError, match="tp=3 is larger than num_kv_heads=2 but not a multiple"):
        kv_head_range(0, 3, 2)
    with pytest.raises(ValueError, match="tp_rank=2 out of range for tp=2"):
        kv_head_range(2, 2, 4)


@pytest.mark.parametrize("layers", range(1, 11))
def test_layer_range_partitions_in_order(layers):
    for pp in range(1, layers + 1):
        ranges = [layer_range(r, pp, layers) for r in range(pp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [hi - lo for lo, hi in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)           # extra layers go to the first stages
    with pytest.raises(ValueError, match=f"pp={layers + 1} stages is more than num_layers={layers}"):
        layer_range(0, layers + 1, layers)
    with pytest.raises(ValueError, match="pp_rank=-1 out of range"):
        layer_range(-1, 1, layers)


@pytest.mark.parametrize("cp", range(1, 7))
def test_cp_token_ranges_partition_and_balance(cp):
    for tokens in range(0, 41):
        per_rank = [cp_token_ranges(r, cp, tokens) for r in range(cp)]
        covered = Counter(t for ranges in per_rank for lo, hi in ranges for t in range(lo, hi))
        assert set(covered) == set(range(tokens)) and set(covered.values()) <= {1}
        assert all(lo < hi for ranges in per_rank for lo, hi in ranges) or tokens == 0 and cp == 1
        assert all(len(ranges) <= 2 for ranges in per_rank)
        sizes = [sum(hi - lo for lo, hi in ranges) for ranges in per_rank]
        assert max(sizes) - min(sizes) <= 2, (cp, tokens, sizes)
        if cp > 1 and tokens >= 2 * cp:
            # one early chunk and one late chunk each: rank 0 holds the first and the last token
            assert per_rank[0][0][0] == 0 and per_rank[0][-1][1] == tokens
    with pytest.raises(ValueError, match=f"cp_rank={cp} out of range for cp={cp}"):
        cp_token_ranges(cp, cp, 8)
