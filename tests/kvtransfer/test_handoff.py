"""The KV handoff protocol over the in-process fake transport (kvtransfer/handoff.py).

A prefill cache holds a prompt's KV at some blocks; after expect -> push -> wait the decode
cache holds exactly that KV at its own blocks and nothing else changed (bit for bit on any
CPU: a handoff copies bytes, it computes nothing).
"""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from cleave.v1.inference_pb2 import Layout
from common.layout import cp_token_ranges, kv_head_range, layer_range
from kvtransfer.fake import FakeFabric
from kvtransfer.handoff import (HandoffError, IncompatiblePeer, KVReceiver, KVSender, compat_hash,
                                transfer_plan)
from kvtransfer.transport import TransferState, make_transport
from tests.handoff_setup import (BLOCK, COMPAT, DECODE_BLOCKS, MODEL, PREFILL_BLOCKS, RecordingTransport,
                                 expected_decode_cache, make_cache, make_landing)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.fixture
def pair():
    """(fabric, prefill transport, decode transport), closed afterwards."""
    fabric = FakeFabric()
    src = RecordingTransport(make_transport("fake", fabric=fabric))
    dst = make_transport("fake", fabric=fabric)
    yield src, dst
    src.close()
    dst.close()


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 11, 16])
def test_push_lands_exactly_the_prompt_kv(pair, num_tokens):
    src, dst = pair
    prefill, decode = make_cache(seed=num_tokens), make_cache(seed=None)
    before = decode.clone()
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    assert receiver.expect("t1", Layout(tp=1, cp=1), num_tokens, time.time() + 10) == 1
    assert receiver.pending() == ["t1"]
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    sent = sender.push(make_landing("t1", num_tokens, {0: dst.address()}), prefill, PREFILL_BLOCKS)
    assert sent == num_tokens * MODEL.kv_bytes_per_token() + 16   # one piece + its trailer
    assert torch.equal(decode, before), "nothing may be written before wait()"
    receiver.wait("t1", DECODE_BLOCKS)
    assert torch.equal(decode, expected_decode_cache(prefill, before, num_tokens))
    receiver.wait("t1", DECODE_BLOCKS)        # waiting again is a no-op
    assert receiver.cancel("t1") is True      # the service forgets it when the sequence ends
    assert receiver.pending() == []


def test_compat_mismatch_sends_nothing(pair):
    src, dst = pair
    prefill, decode = make_cache(seed=1), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 6, time.time() + 10)
    other = compat_hash("tiny", MODEL.replace(dtype="bfloat16"), BLOCK)
    assert other != COMPAT and compat_hash("tiny", MODEL, 2 * BLOCK) != COMPAT
    sender = KVSender(src, MODEL, other, Layout(tp=1, cp=1))
    with pytest.raises(IncompatiblePeer, match=f"expects compat hash {COMPAT}, this prefill instance has {other}"):
        sender.push(make_landing("t", 6, {0: dst.address()}), prefill, PREFILL_BLOCKS)
    assert src.sends == 0
    assert receiver.pending() == ["t"]
    assert all(h.poll() is TransferState.PENDING for _, h, _ in receiver._expected["t"].pieces)
    # the reservation is still good for a compatible sender
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 6, {0: dst.address()}),
                                                         prefill, PREFILL_BLOCKS)
    receiver.wait("t", DECODE_BLOCKS)
    assert torch.equal(decode, expected_decode_cache(prefill, make_cache(seed=None), 6))


def test_source_layout_mismatch_sends_nothing(pair):
    src, dst = pair
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    with pytest.raises(HandoffError, match="prefill layout tp=2 cp=1, this instance is tp=1 cp=1"):
        sender.push(make_landing("t", 4, {0: dst.address()}, source_layout=Layout(tp=2, cp=1)),
                    make_cache(seed=0), PREFILL_BLOCKS)
    assert src.sends == 0


def test_deadline_passed_before_push(pair):
    src, dst = pair
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    with pytest.raises(HandoffError, match="deadline passed before sending"):
        sender.push(make_landing("late", 4, {0: dst.address()}, deadline=time.time() - 1), make_cache(seed=0),
                    PREFILL_BLOCKS)
    assert src.sends == 0


def test_wait_fails_when_nothing_lands_by_the_deadline(pair):
    _, dst = pair
    decode = make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 5, time.time() + 0.2)
    start = time.monotonic()
    with pytest.raises(HandoffError, match="not landed within its deadline|missed its deadline"):
        receiver.wait("t", DECODE_BLOCKS)
    assert time.monotonic() - start < 5
    assert torch.equal(decode, make_cache(seed=None))


def test_wait_timeout_shorter_than_deadline(pair):
    _, dst = pair
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 5, time.time() + 60)
    start = time.monotonic()
    with pytest.raises(HandoffError):
        receiver.wait("t", DECODE_BLOCKS, timeout=0.1)
    assert time.monotonic() - start < 5


def test_cancel_before_wait(pair):
    src, dst = pair
    prefill, decode = make_cache(seed=2), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 9, time.time() + 10)
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 9, {0: dst.address()}),
                                                         prefill, PREFILL_BLOCKS)
    assert receiver.cancel("t") is True
    assert receiver.cancel("t") is False
    assert receiver.pending() == []
    with pytest.raises(HandoffError, match="no transfer 't' expected"):
        receiver.wait("t", DECODE_BLOCKS)
    assert torch.equal(decode, make_cache(seed=None)), "a cancelled transfer must not write the blocks"


def test_cancel_fails_pending_receives_so_a_late_push_fails(pair):
    src, dst = pair
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 9, time.time() + 0.5)
    receiver.cancel("t")
    with pytest.raises(HandoffError, match="failed"):
        KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 9, {0: dst.address()},
                                                                       deadline=time.time() + 0.5),
                                                             make_cache(seed=0), PREFILL_BLOCKS)


def _flip_first_payload_byte(buf: torch.Tensor) -> None:
    buf[0] ^= 0x40


def _flip_trailer_magic(buf: torch.Tensor) -> None:
    buf[-16] ^= 0x01


@pytest.mark.parametrize("tamper,match", [(_flip_first_payload_byte, "checksum mismatch"),
                                          (_flip_trailer_magic, "bad message trailer")])
def test_corrupted_message_is_detected(tamper, match):
    fabric = FakeFabric()
    src = RecordingTransport(make_transport("fake", fabric=fabric), tamper=tamper)
    dst = make_transport("fake", fabric=fabric)
    decode = make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 7, time.time() + 10)
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 7, {0: dst.address()}),
                                                         make_cache(seed=3), PREFILL_BLOCKS)
    with pytest.raises(HandoffError, match=match):
        receiver.wait("t", DECODE_BLOCKS)
    assert torch.equal(decode, make_cache(seed=None))
    src.close()
    dst.close()


def test_without_checksum_corruption_goes_unnoticed():
    """Documents what the CRC buys: with checksum off the flipped byte lands silently."""
    fabric = FakeFabric()
    src = RecordingTransport(make_transport("fake", fabric=fabric), tamper=_flip_first_payload_byte)
    dst = make_transport("fake", fabric=fabric)
    prefill, decode = make_cache(seed=4), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("t", Layout(tp=1, cp=1), 7, time.time() + 10)
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 7, {0: dst.address()}, checksum=False),
                                                         prefill, PREFILL_BLOCKS)
    receiver.wait("t", DECODE_BLOCKS)
    expected = expected_decode_cache(prefill, make_cache(seed=None), 7)
    assert not torch.equal(decode, expected)
    assert (decode != expected).sum() == 1


def test_missing_decode_rank_address():
    fabric = FakeFabric()
    src = make_transport("fake", fabric=fabric)
    with pytest.raises(HandoffError, match="no address for decode rank 0"):
        KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("t", 4, {}), make_cache(seed=0),
                                                             PREFILL_BLOCKS)


# ---- several ranks on each side ------------------------------------------------------------

@pytest.mark.parametrize("src_tp,cp,dst_tp,pp,num_tokens", [
    (1, 1, 2, 1, 6), (2, 1, 1, 1, 6), (1, 2, 1, 2, 9), (2, 2, 2, 1, 13), (2, 1, 1, 3, 5),
    (1, 2, 4, 1, 10), (4, 1, 2, 2, 7), (2, 2, 1, 3, 1),
])
def test_multi_rank_handoff(src_tp, cp, dst_tp, pp, num_tokens):
    fabric = FakeFabric()
    full = make_cache(seed=10)            # the whole model's KV of the prompt at PREFILL_BLOCKS
    src_layout, dst_layout = Layout(tp=src_tp, cp=cp), Layout(tp=dst_tp, pp=pp)

    receivers, caches, addresses, transports = {}, {}, {}, []
    for p, t in itertools.product(range(pp), range(dst_tp)):
        rank = p * dst_tp + t
        layers, heads = layer_range(p, pp, MODEL.num_layers), kv_head_range(t, dst_tp, MODEL.num_kv_heads)
        kv = make_cache(seed=None, num_layers=layers[1] - layers[0], num_kv_heads=heads[1] - heads[0])
        transport = make_transport("fake", fabric=fabric)
        transports.append(transport)
        receivers[rank] = (KVReceiver(transport, kv, MODEL, dst_layout, rank=rank, layer_offset=layers[0],
                                      head_offset=heads[0]), layers, heads)
        caches[rank] = kv
        addresses[rank] = transport.address()
    posted = sum(r.expect("x", src_layout, num_tokens, time.time() + 10)
                 for r, _, _ in receivers.values())
    assert posted == len(transfer_plan(src_layout, dst_layout, MODEL, num_tokens))

    landing = make_landing("x", num_tokens, addresses, layout=dst_layout, source_layout=src_layout)
    for c, t in itertools.product(range(cp), range(src_tp)):
        heads = kv_head_range(t, src_tp, MODEL.num_kv_heads)
        shard = full[:, :, :, :, heads[0]:heads[1]].clone()
        # garbage at the positions this CP rank does not own: it must never send them
        own = {p for lo, hi in cp_token_ranges(c, cp, num_tokens) for p in range(lo, hi)}
        for p in set(range(num_tokens)) - own:
            shard[:, :, PREFILL_BLOCKS[p // BLOCK], p % BLOCK] = 1e6
        transport = make_transport("fake", fabric=fabric)
        transports.append(transport)
        KVSender(transport, MODEL, COMPAT, src_layout, rank=c * src_tp + t, head_offset=heads[0]).push(
            landing, shard.contiguous(), PREFILL_BLOCKS)

    for rank, (receiver, layers, heads) in receivers.items():
        receiver.wait("x", DECODE_BLOCKS)
        want = expected_decode_cache(full, make_cache(seed=None), num_tokens)[layers[0]:layers[1], :, :, :, heads[0]:heads[1]]
        assert torch.equal(caches[rank], want), f"decode rank {rank}"
    for transport in transports:
        transport.close()
