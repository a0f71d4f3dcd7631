"""The fast handoff's parts (kvtransfer/crc.py host CRC, kvtransfer/staging.py buffer pool,
kvtransfer/handoff.py landing order, checksum negotiation and stage times).

Pieces land and are scattered in whatever order they arrive, a corrupt one never reaches the
blocks, either side may turn the CRC off, and message buffers go back to their path's pool
only once their transfer is done. The caches compare bit for bit: the pieces are copied bytes.
"""
from __future__ import annotations

import gc
import struct
import threading
import time
import weakref
import zlib

import pytest
import torch

from cleave.v1.inference_pb2 import Layout
from common.layout import cp_token_ranges
from kvtransfer.crc import _libdeflate_crc32, crc32, host_crc32, host_crc_backend
from kvtransfer.fake import FakeFabric
from kvtransfer.handoff import HandoffError, KVReceiver, KVSender
from kvtransfer.message import HandoffTimes
from kvtransfer.staging import HostBufferPool
from kvtransfer.transport import make_transport
from tests.handoff_setup import (COMPAT, DECODE_BLOCKS, MODEL, PREFILL_BLOCKS, SENTINEL, RecordingTransport,
                                 expected_decode_cache, make_cache, make_landing)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]
MiB = 1 << 20
BACKENDS = ["zlib", pytest.param("libdeflate", marks=pytest.mark.skipif(
    _libdeflate_crc32() is None, reason="libdeflate is not installed"))]


def _bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- the host CRC ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 9, 4095, MiB + 3])
def test_host_crc_equals_zlib_and_continues_a_running_value(backend, n):
    data = _bytes(n, seed=n)
    want = zlib.crc32(data.numpy())
    assert host_crc32(data, backend=backend) == want
    cut = n // 3
    assert host_crc32(data[cut:], host_crc32(data[:cut], backend=backend), backend=backend) == want
    assert crc32(data) == want                                  # the default backend


def test_host_crc_of_a_float_tensor_is_over_its_bytes():
    x = torch.randn(3, 5, 7)
    assert host_crc32(x) == zlib.crc32(x.numpy().tobytes())
    assert host_crc_backend() in ("libdeflate", "zlib")


def test_host_crc_rejects_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        host_crc32(torch.zeros(4, 4)[:, 1])
    with pytest.raises(ValueError, match="CRC backend must be"):
        host_crc32(_bytes(8), backend="crc32c")


# ---- the host buffer pool -------------------------------------------------------------------

def test_pool_reuses_a_given_back_buffer_of_a_fitting_size():
    pool = HostBufferPool(max_bytes=64 * MiB)
    a = pool.take(1000)
    assert a.numel() == 1000 and a.dtype == torch.uint8
    b = pool.take(1000)
    assert b.data_ptr() != a.data_ptr()                 # two live buffers never share memory
    pool.give_back(a)
    assert pool.idle_bytes() == MiB                     # sized in whole MiB
    c = pool.take(900)
    assert c.data_ptr() == a.data_ptr() and c.numel() == 900
    pool.give_back(c)
    big = pool.take(10 * MiB)                           # the 1 MiB buffer does not fit
    assert big.data_ptr() != a.data_ptr()
    pool.give_back(big)
    small = pool.take(10)                               # nor is a 10 MiB one wasted on 10 bytes
    assert small.data_ptr() == a.data_ptr()


def test_pool_keeps_at_most_max_bytes_and_ignores_foreign_tensors():
    pool = HostBufferPool(max_bytes=2 * MiB)
    views = [pool.take(MiB) for _ in range(3)]
    for v in views:
        pool.give_back(v)
    assert pool.idle_bytes() == 2 * MiB
    pool.give_back(torch.empty(5 * MiB, dtype=torch.uint8))
    pool.give_back(views[0])                            # given back twice: once only
    assert pool.idle_bytes() == 2 * MiB
    assert HostBufferPool(max_bytes=0).take(10).numel() == 10
    with pytest.raises(ValueError, match="max_bytes"):
        HostBufferPool(max_bytes=-1)


def test_pool_does_not_keep_a_buffer_that_is_never_given_back():
    """A failed transfer's buffer is not given back; it must be freed with its last user."""
    pool = HostBufferPool()
    view = pool.take(1000)
    base = weakref.ref(view._base)
    del view
    gc.collect()
    assert base() is None and pool.idle_bytes() == 0


# ---- landing order, checksum negotiation, buffers, times -------------------------------------

def _pair(tamper=None):
    fabric = FakeFabric()
    return RecordingTransport(make_transport("fake", fabric=fabric), tamper=tamper), \
        make_transport("fake", fabric=fabric)


def test_pieces_are_scattered_as_they_land_in_any_order():
    """Two CP prefill ranks send one decode rank four pieces; rank 1's land first and are in
    the blocks at the next try_land, before rank 0 has sent anything."""
    tokens, layout = 9, Layout(tp=1, cp=2)
    fabric = FakeFabric()
    dst = make_transport("fake", fabric=fabric)
    full, decode = make_cache(seed=21), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    assert receiver.expect("o", layout, tokens, time.time() + 10) == 4
    landing = make_landing("o", tokens, {0: dst.address()}, source_layout=layout)
    want = expected_decode_cache(full, make_cache(seed=None), tokens)
    senders = [KVSender(make_transport("fake", fabric=fabric), MODEL, COMPAT, layout, rank=r) for r in (0, 1)]

    senders[1].push(landing, full, PREFILL_BLOCKS)
    assert receiver.try_land("o", DECODE_BLOCKS) is False
    mine = [p for lo, hi in cp_token_ranges(1, 2, tokens) for p in range(lo, hi)]
    for p in range(tokens):
        block, slot = DECODE_BLOCKS[p // 4], p % 4
        if p in mine:
            assert torch.equal(decode[:, :, block, slot], want[:, :, block, slot]), p
        else:
            assert (decode[:, :, block, slot] == SENTINEL).all(), p
    assert receiver.times("o").pieces == 2

    senders[0].push(landing, full, PREFILL_BLOCKS)
    assert receiver.try_land("o", DECODE_BLOCKS) is True
    assert torch.equal(decode, want)
    for s in senders + [receiver]:
        s.transport.close()


def test_wait_lands_a_piece_that_arrives_while_it_blocks():
    src, dst = _pair()
    prefill, decode = make_cache(seed=22), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("w", Layout(tp=1, cp=1), 10, time.time() + 10)
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    late = threading.Timer(0.2, sender.push, (make_landing("w", 10, {0: dst.address()}), prefill, PREFILL_BLOCKS))
    late.start()
    start = time.monotonic()
    receiver.wait("w", DECODE_BLOCKS)
    assert 0.15 < time.monotonic() - start < 5
    late.join()
    assert torch.equal(decode, expected_decode_cache(prefill, make_cache(seed=None), 10))
    src.close()
    dst.close()


@pytest.mark.parametrize("sender_on,decode_on", [(True, True), (False, True), (True, False), (False, False)])
def test_checksum_is_on_only_when_both_sides_want_it(sender_on, decode_on):
    wire: list[bytes] = []
    src, dst = _pair(tamper=lambda b: wire.append(b.numpy().tobytes()))
    prefill, decode = make_cache(seed=23), make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("c", Layout(tp=1, cp=1), 6, time.time() + 10)
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1), checksum=sender_on).push(
        make_landing("c", 6, {0: dst.address()}, checksum=decode_on), prefill, PREFILL_BLOCKS)
    receiver.wait("c", DECODE_BLOCKS)
    assert torch.equal(decode, expected_decode_cache(prefill, make_cache(seed=None), 6))
    (message,) = wire
    magic, version, crc, has_crc = struct.unpack("<IIII", message[-16:])
    on = sender_on and decode_on
    assert (magic, version, has_crc) == (0x564B4C43, 1, int(on))
    assert crc == (zlib.crc32(message[:-16]) if on else 0)
    src.close()
    dst.close()


def test_buffers_go_back_to_the_pools_only_when_done_and_times_are_recorded():
    src, dst = _pair()
    prefill = make_cache(seed=24)
    receiver = KVReceiver(dst, make_cache(seed=None), MODEL, Layout(tp=1, pp=1))
    sender = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    pools = (sender.path("cpu").pool, receiver.path.pool)
    for i in range(2):
        receiver.expect(f"b{i}", Layout(tp=1, cp=1), 8, time.time() + 10)
        times = HandoffTimes()
        sent = sender.push(make_landing(f"b{i}", 8, {0: dst.address()}), prefill, PREFILL_BLOCKS, times=times)
        receiver.wait(f"b{i}", DECODE_BLOCKS)
        assert (times.pieces, times.bytes) == (1, sent)
        assert times.pack_s > 0 and times.checksum_s > 0 and times.total_s >= times.send_s >= 0
        got = receiver.times(f"b{i}")
        assert (got.pieces, got.bytes) == (1, sent) and got.scatter_s > 0 and got.checksum_s > 0
        assert [p.idle_bytes() for p in pools] == [MiB, MiB], "one reused buffer each, not one per push"
        receiver.cancel(f"b{i}")
    assert receiver.times("b0") is None

    # a push that fails (nobody posted the receive: it times out) keeps its buffer out of the pool
    fresh = KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1))
    with pytest.raises(HandoffError, match="failed"):
        fresh.push(make_landing("gone", 8, {0: dst.address()}, deadline=time.time() + 0.3), prefill, PREFILL_BLOCKS)
    assert fresh.path("cpu").pool.idle_bytes() == 0
    src.close()
    dst.close()


def test_a_corrupt_piece_fails_every_later_call_and_is_never_written():
    src, dst = _pair(tamper=lambda b: b.__setitem__(3, b[3] ^ 1))
    decode = make_cache(seed=None)
    receiver = KVReceiver(dst, decode, MODEL, Layout(tp=1, pp=1))
    receiver.expect("x", Layout(tp=1, cp=1), 5, time.time() + 10)
    KVSender(src, MODEL, COMPAT, Layout(tp=1, cp=1)).push(make_landing("x", 5, {0: dst.address()}),
                                                         make_cache(seed=25), PREFILL_BLOCKS)
    for call in (receiver.try_land, receiver.wait):
        with pytest.raises(HandoffError, match="checksum mismatch on piece"):
            call("x", DECODE_BLOCKS)
    assert torch.equal(decode, make_cache(seed=None))
    src.close()
    dst.close()
