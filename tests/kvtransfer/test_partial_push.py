"""A push sends only what the decode instance lacks (issue 21; kvtransfer/handoff.py).

The decode instance may hold the KV of a prompt's leading whole blocks in its prefix cache; the
landing descriptor says how many tokens (``num_cached_tokens`` = k) and names them by their
chained hash (``cached_prefix_hash``). Both sides plan tokens ``[k, n)`` only
(``transfer_plan(..., first_token=k)``, CP zigzag chunks cut), the push sends exactly those
bytes, the receiver scatters them at their absolute positions into the block table the caller
passes at landing time, and the first k tokens' slots are never written. With k = n nothing
moves and the transfer lands at once. ``check_cached_prefix`` refuses a landing whose cached
prefix is not the prompt's.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest
import torch

from cleave.v1.inference_pb2 import Layout
from common.kv_hash import chain_root, prefix_hash
from common.layout import cp_token_ranges, kv_head_range, layer_range
from kvtransfer.fake import FakeFabric
from kvtransfer.handoff import (HandoffError, IncompatiblePeer, KVReceiver, KVSender, check_cached_prefix,
                                transfer_plan)
from kvtransfer.transport import make_transport
from tests.handoff_setup import (BLOCK, COMPAT, DECODE_BLOCKS, MODEL, PREFILL_BLOCKS, SENTINEL,
                                 RecordingTransport, expected_decode_cache, make_cache, make_landing)
from tests.kvtransfer.test_plan import PAIRS, SHAPES, _model, _tp_ok

pytestmark = pytest.mark.timeout(60)
TRAILER = 16
GARBAGE = 1e6


# ---- the plan ---------------------------------------------------------------------------------

def _check_cut_plan(src, dst, model, n, k):
    plan = transfer_plan(src, dst, model, n, k)
    full = transfer_plan(src, dst, model, n)
    assert plan == transfer_plan(src, dst, model, n, k), "not deterministic"
    got: dict[int, Counter] = {}
    for piece in plan:
        assert k <= piece.tokens[0] < piece.tokens[1] <= n, piece
        # every piece is the cut of a piece of the full plan (same ranks, layers, heads)
        assert any((f.src, f.dst, f.layers, f.heads) == (piece.src, piece.dst, piece.layers, piece.heads)
                   and f.tokens[0] <= piece.tokens[0] and piece.tokens[1] <= f.tokens[1]
                   and (piece.tokens[0] == k or piece.tokens[0] == f.tokens[0]) for f in full), piece
        got.setdefault(piece.dst, Counter()).update(
            itertools.product(range(*piece.layers), range(*piece.heads), range(*piece.tokens)))
    # each decode rank gets each (layer, head) of tokens [k, n) it needs exactly once
    for f in full:
        want = set(itertools.product(range(*f.layers), range(*f.heads), range(max(k, f.tokens[0]), f.tokens[1])))
        have = got.get(f.dst, Counter())
        assert all(have[x] == 1 for x in want), (f, k)
    assert sum(sum(c.values()) for c in got.values()) == sum(
        (p.layers[1] - p.layers[0]) * (p.heads[1] - p.heads[0]) * max(0, p.tokens[1] - max(k, p.tokens[0]))
        for p in full)
    return plan


@pytest.mark.unit
@pytest.mark.parametrize("layers,heads", SHAPES)
def test_cut_plan_is_the_full_plan_cut_to_the_uncached_tokens(layers, heads):
    model = _model(layers, heads)
    for (src_tp, cp), (dst_tp, pp) in itertools.product(PAIRS, PAIRS):
        if not (_tp_ok(src_tp, heads) and _tp_ok(dst_tp, heads)) or pp > layers:
            continue
        src, dst = Layout(tp=src_tp, cp=cp), Layout(tp=dst_tp, pp=pp)
        for n in (1, 7, 16):
            assert transfer_plan(src, dst, model, n, 0) == transfer_plan(src, dst, model, n)
            assert transfer_plan(src, dst, model, n, n) == []
            for k in range(n + 1):
                _check_cut_plan(src, dst, model, n, k)


@pytest.mark.unit
def test_cut_plan_cuts_cp_zigzag_chunks_and_drops_empty_ones():
    src, dst = Layout(tp=1, cp=2), Layout(tp=1, pp=1)
    assert cp_token_ranges(0, 2, 13) == ((0, 3), (9, 13)) and cp_token_ranges(1, 2, 13) == ((3, 6), (6, 9))
    tokens = lambda k: [(p.src, p.tokens) for p in transfer_plan(src, dst, MODEL, 13, k)]   # noqa: E731
    assert tokens(0) == [(0, (0, 3)), (0, (9, 13)), (1, (3, 6)), (1, (6, 9))]
    assert tokens(4) == [(0, (9, 13)), (1, (4, 6)), (1, (6, 9))]
    assert tokens(8) == [(0, (9, 13)), (1, (8, 9))]
    assert tokens(12) == [(0, (12, 13))]                   # CP rank 1 has nothing left to send
    with pytest.raises(ValueError, match="first_token"):
        transfer_plan(src, dst, MODEL, 13, 14)
    with pytest.raises(ValueError, match="first_token"):
        transfer_plan(src, dst, MODEL, 13, -1)


# ---- pushes between several ranks on each side -------------------------------------------------

def _transport(name: str, fabric: FakeFabric):
    return make_transport(name, **({"fabric": fabric} if name == "fake" else {}))


def _handoff(name, src_tp, cp, dst_tp, pp, n, k, transfer_id="x"):
    """expect (k cached) on every decode rank, check nothing is written, push from every prefill
    rank, land with the block table. Returns (bytes sent, sends, plan, [(cache, layers, heads)], full)."""
    fabric = FakeFabric()
    full = make_cache(seed=100 + n + k)              # the whole model's KV of the prompt at PREFILL_BLOCKS
    src_layout, dst_layout = Layout(tp=src_tp, cp=cp), Layout(tp=dst_tp, pp=pp)
    plan = transfer_plan(src_layout, dst_layout, MODEL, n, k)
    transports, receivers, addresses = [], {}, {}
    try:
        for p, t in itertools.product(range(pp), range(dst_tp)):
            rank = p * dst_tp + t
            layers, heads = layer_range(p, pp, MODEL.num_layers), kv_head_range(t, dst_tp, MODEL.num_kv_heads)
            kv = make_cache(seed=None, num_layers=layers[1] - layers[0], num_kv_heads=heads[1] - heads[0])
            transport = _transport(name, fabric)
            transports.append(transport)
            receivers[rank] = (KVReceiver(transport, kv, MODEL, dst_layout, rank=rank, layer_offset=layers[0],
                                          head_offset=heads[0]), kv, layers, heads)
            addresses[rank] = transport.address()
        posted = sum(r.expect(transfer_id, src_layout, n, time.time() + 20, first_token=k)
                     for r, _, _, _ in receivers.values())
        assert posted == len(plan)
        if k == n:   # nothing expected: lands at once, before (and without) any push
            assert all(r.try_land(transfer_id, DECODE_BLOCKS) for r, _, _, _ in receivers.values())

        landing = make_landing(transfer_id, n, addresses, layout=dst_layout, source_layout=src_layout,
                               num_cached_tokens=k)
        sent = sends = 0
        for c, t in itertools.product(range(cp), range(src_tp)):
            heads = kv_head_range(t, src_tp, MODEL.num_kv_heads)
            shard = full[:, :, :, :, heads[0]:heads[1]].clone()
            # garbage where this rank must send nothing: positions its CP rank does not own, and
            # the cached prefix (the decode instance has those already)
            own = {p for lo, hi in cp_token_ranges(c, cp, n) for p in range(lo, hi) if p >= k}
            for p in set(range(n)) - own:
                shard[:, :, PREFILL_BLOCKS[p // BLOCK], p % BLOCK] = GARBAGE
            transport = RecordingTransport(_transport(name, fabric))
            transports.append(transport)
            sent += KVSender(transport, MODEL, COMPAT, src_layout, rank=c * src_tp + t,
                             head_offset=heads[0]).push(landing, shard.contiguous(), PREFILL_BLOCKS)
            sends += transport.sends
        for rank, (receiver, _, _, _) in receivers.items():
            receiver.wait(transfer_id, DECODE_BLOCKS)
            assert receiver.try_land(transfer_id, DECODE_BLOCKS) is True
        return sent, sends, plan, [(kv, layers, heads) for _, kv, layers, heads in receivers.values()], full
    finally:
        for transport in transports:
            transport.close()


def _check_landed(caches, full, n, k):
    for kv, layers, heads in caches:
        want = expected_decode_cache(full, make_cache(seed=None), n, first_token=k)
        want = want[layers[0]:layers[1], :, :, :, heads[0]:heads[1]]
        assert torch.equal(kv, want), f"decode rank of layers {layers}, heads {heads}"
        for p in range(k):   # the cached prefix's slots are untouched
            assert (kv[:, :, DECODE_BLOCKS[p // BLOCK], p % BLOCK] == SENTINEL).all(), p


LAYOUTS = [  # (src_tp, cp, dst_tp, pp): 1->1, TP2->TP1, TP1->TP2xPP2, CP2->TP2, and more
    (1, 1, 1, 1), (2, 1, 1, 1), (1, 1, 2, 2), (1, 2, 2, 1), (2, 2, 1, 3), (4, 1, 2, 1), (1, 2, 1, 2)]


@pytest.mark.unit
@pytest.mark.parametrize("src_tp,cp,dst_tp,pp", LAYOUTS)
@pytest.mark.parametrize("n,k", [(13, 0), (13, 4), (13, 8), (13, 12), (16, 16), (16, 8), (9, 4), (4, 4), (1, 0)])
def test_push_lands_exactly_the_uncached_tokens(src_tp, cp, dst_tp, pp, n, k):
    sent, sends, plan, caches, full = _handoff("fake", src_tp, cp, dst_tp, pp, n, k)
    _check_landed(caches, full, n, k)
    assert sends == len(plan)
    # bytes are proportional to n - k: each token of each (layer, head) once (no replicated
    # decode heads in these layouts), plus one trailer per piece
    assert sent == (n - k) * MODEL.kv_bytes_per_token() + TRAILER * len(plan)
    if k == n:
        assert (sent, sends, plan) == (0, 0, [])


@pytest.mark.unit
def test_bytes_sent_shrink_with_the_cached_prefix():
    sizes = {k: _handoff("fake", 1, 1, 1, 1, 16, k)[0] for k in (0, 4, 8, 12, 16)}
    per_block = BLOCK * MODEL.kv_bytes_per_token()
    assert sizes == {k: (16 - k) // BLOCK * per_block + (TRAILER if k < 16 else 0) for k in sizes}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tcp", "ucx"])
@pytest.mark.parametrize("src_tp,cp,dst_tp,pp,n,k", [
    (1, 1, 1, 1, 13, 8), (2, 1, 1, 1, 13, 4), (1, 1, 2, 2, 16, 16), (1, 2, 2, 1, 13, 4), (1, 2, 2, 1, 13, 12)])
def test_partial_push_over_real_transports(name, src_tp, cp, dst_tp, pp, n, k):
    sent, sends, plan, caches, full = _handoff(name, src_tp, cp, dst_tp, pp, n, k, transfer_id=f"{name}-{k}")
    _check_landed(caches, full, n, k)
    assert sends == len(plan)
    assert sent == (n - k) * MODEL.kv_bytes_per_token() + TRAILER * len(plan)


# ---- the receiver takes the block table at landing time -------------------------------------

@pytest.fixture
def pair():
    fabric = FakeFabric()
    src = RecordingTransport(make_transport("fake", fabric=fabric))
    dst = make_transport("fake", fabric=fabric)
    yield src, dst
    src.close()
    dst.close()


@pytest.mark.unit
def test_pieces_land_in_the_block_table_given_at_landing_time(pair):
    """The receiver keeps no block ids: the table passed to try_land (here other blocks than at
    any earlier call, and one longer than the prompt: grown for decoding) is the one written."""
    src, dst = pair
    prefill, decode = make_cache(seed=31), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    assert receiver.expect("t", Layout(tp=1, cp=1), 10, time.time() + 10, first_token=4) == 1
    assert receiver.try_land("t", [0, 1, 2]) is False          # nothing in yet: nothing written
    assert torch.equal(decode, make_cache(seed=None))
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(
        make_landing("t", 10, {0: dst.address()}, num_cached_tokens=4), prefill, PREFILL_BLOCKS)
    table = [8, 4, 0, 11]                                         # 16 slots for a 10-token prompt
    assert receiver.try_land("t", table) is True
    want = make_cache(seed=None)
    for p in range(4, 10):
        want[:, :, table[p // BLOCK], p % BLOCK] = prefill[:, :, PREFILL_BLOCKS[p // BLOCK], p % BLOCK]
    assert torch.equal(decode, want)


@pytest.mark.unit
def test_a_block_table_that_cannot_hold_the_prompt_is_refused(pair):
    _, dst = pair
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 10, time.time() + 10, first_token=4)
    with pytest.raises(ValueError, match="2 blocks of 4 tokens cannot hold the 10-token prompt"):
        receiver.try_land("t", [3, 7])
    with pytest.raises(ValueError, match="cannot hold"):
        receiver.wait("t", [3, 7], timeout=0.1)
    assert receiver.try_land("t", DECODE_BLOCKS) is False        # still posted, not failed


@pytest.mark.unit
def test_expect_refuses_a_first_token_outside_the_prompt(pair):
    _, dst = pair
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    with pytest.raises(ValueError, match="first_token"):
        receiver.expect("t", Layout(tp=1, cp=1), 8, time.time() + 10, first_token=12)
    assert receiver.pending() == []


@pytest.mark.unit
def test_fully_cached_prompt_lands_at_once_and_cancel_still_forgets_it(pair):
    _, dst = pair
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    assert receiver.expect("t", Layout(tp=1, cp=2), 8, time.time() + 10, first_token=8) == 0
    receiver.wait("t", DECODE_BLOCKS)
    assert receiver.try_land("t", []) is True           # nothing to write: any table will do
    assert receiver.times("t").pieces == 0
    assert receiver.cancel("t") is True and receiver.pending() == []


@pytest.mark.unit
@pytest.mark.parametrize("cached", [2, 5, 12])
def test_push_refuses_a_cached_count_that_is_not_whole_blocks_of_the_prompt(pair, cached):
    src, dst = pair
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    with pytest.raises(IncompatiblePeer, match=f"holds {cached} cached tokens"):
        sender.push(make_landing("t", 10, {0: dst.address()}, num_cached_tokens=cached), make_cache(seed=0),
                    PREFILL_BLOCKS)
    assert src.sends == 0


# ---- check_cached_prefix -------------------------------------------------------------------------

PROMPT = [5, 9, 1, 33, 2, 2, 7, 60, 14, 3, 8]        # 11 tokens: two whole blocks and 3 more
DST = Layout(tp=2, pp=1, cp=1, ep=1)


def _cached_landing(k, prompt=PROMPT, compat=COMPAT, layout=DST, hash_layout=None, num_tokens=None):
    h = prefix_hash(prompt[:k], BLOCK, chain_root(compat, hash_layout or layout)) if k else b""
    return make_landing("t", len(PROMPT) if num_tokens is None else num_tokens, {}, compat=compat,
                        layout=layout, num_cached_tokens=k, cached_prefix_hash=h)


@pytest.mark.unit
@pytest.mark.parametrize("k", [0, 4, 8])
def test_check_cached_prefix_accepts_the_prompts_own_prefix(k):
    check_cached_prefix(_cached_landing(k), PROMPT)
    check_cached_prefix(_cached_landing(k), PROMPT + [1, 2, 3])       # only the prefix matters


@pytest.mark.unit
def test_check_cached_prefix_accepts_a_fully_cached_prompt():
    prompt = PROMPT[:8]
    check_cached_prefix(_cached_landing(8, prompt=prompt, num_tokens=8), prompt)


@pytest.mark.unit
def test_check_cached_prefix_with_nothing_cached_checks_nothing():
    check_cached_prefix(make_landing("t", 11, {}), PROMPT)
    check_cached_prefix(make_landing("t", 11, {}, cached_prefix_hash=b"stale"), [])


@pytest.mark.unit
@pytest.mark.parametrize("where", [0, 3, 4, 7])
def test_check_cached_prefix_refuses_another_prompts_prefix(where):
    other = list(PROMPT)
    other[where] += 1
    with pytest.raises(IncompatiblePeer, match="not this prompt's prefix"):
        check_cached_prefix(_cached_landing(8, prompt=other), PROMPT)
    # a change after the cached prefix does not matter
    check_cached_prefix(_cached_landing(8), PROMPT[:8] + [0, 0, 0])


@pytest.mark.unit
def test_check_cached_prefix_refuses_a_hash_of_another_root():
    with pytest.raises(IncompatiblePeer, match="not this prompt's prefix"):   # another layout's chain
        check_cached_prefix(_cached_landing(4, hash_layout=Layout(tp=1, pp=1, cp=1, ep=1)), PROMPT)
    bad = _cached_landing(4)
    bad.cached_prefix_hash = b""
    with pytest.raises(IncompatiblePeer, match="not this prompt's prefix"):
        check_cached_prefix(bad, PROMPT)


@pytest.mark.unit
@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_check_cached_prefix_refuses_a_count_that_is_not_whole_blocks(k):
    landing = _cached_landing(0)
    landing.num_cached_tokens = k
    with pytest.raises(IncompatiblePeer, match=f"{k} cached tokens is not a whole number of blocks"):
        check_cached_prefix(landing, PROMPT)


@pytest.mark.unit
def test_check_cached_prefix_refuses_a_count_beyond_the_prompt():
    landing = _cached_landing(0)
    landing.num_cached_tokens = 12                        # whole blocks, but the prompt has 11 tokens
    with pytest.raises(IncompatiblePeer, match="exceed the prompt"):
        check_cached_prefix(landing, PROMPT)
    with pytest.raises(IncompatiblePeer, match="exceed the prompt"):
        check_cached_prefix(_cached_landing(8), PROMPT[:6])


# ---- through the executor (one rank, fake model: KV = token ids) -----------------------------------

@pytest.mark.unit
def test_executor_expect_and_try_land_with_a_cached_prefix():
    from common.flags import replace
    from engine.runtime.config import RuntimeConfig
    from engine.runtime.fake import FakeExecutor, tiny_config

    fabric = FakeFabric()
    cfg = replace(RuntimeConfig(), block_size=BLOCK, num_blocks=16, transport="fake", model="fake-model")
    prefill, decode = (FakeExecutor(cfg, model_config=tiny_config(), transport=make_transport("fake", fabric=fabric))
                       for _ in range(2))
    try:
        prompt, k = list(range(101, 111)), 8                      # 10 tokens, two blocks cached
        prefill_blocks, decode_blocks = [6, 2, 9], [1, 12, 4]
        prefill.prefill(prompt, prefill_blocks)
        decode.runner.kv_cache.fill_(SENTINEL)
        decode.expect("r:1", Layout(tp=1, cp=1), len(prompt), time.time() + 10, first_token=k)
        assert decode.try_land("r:1", decode_blocks) is False
        layout = Layout(tp=1, pp=1, cp=1, ep=1)
        landing = make_landing("r:1", len(prompt), {0: decode.transport_addresses[0]}, compat=decode.compat,
                               layout=layout, num_cached_tokens=k,
                               cached_prefix_hash=prefix_hash(prompt[:k], BLOCK, chain_root(decode.compat, layout)))
        check_cached_prefix(landing, prompt)
        per_token = decode.runner.kv_cache[:, :, 0, 0].numel() * 4
        assert prefill.push(landing, prefill_blocks) == (len(prompt) - k) * per_token + TRAILER
        deadline = time.time() + 10
        while not decode.try_land("r:1", decode_blocks):
            assert time.time() < deadline
            time.sleep(0.005)
        kv = decode.runner.kv_cache
        for p, token in enumerate(prompt):
            slot = kv[:, :, decode_blocks[p // BLOCK], p % BLOCK]
            assert (slot == (token if p >= k else SENTINEL)).all(), p
        decode.cancel("r:1")
        with pytest.raises(HandoffError, match="no transfer"):
            decode.try_land("r:1", decode_blocks)
    finally:
        prefill.close()
        decode.close()
