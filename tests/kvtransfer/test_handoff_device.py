"""The KV handoff on any device: direct vs staged message paths, the device CRC, transports'
device support (kvtransfer/staging.py, kvtransfer/crc.py, KVTransport.supports_device).

On CPU (here) staging is forced to exercise the path a CUDA cache takes over a host-only
transport: every combination of a direct or staged sender and receiver, over TCP and UCX, must
put the same bytes on the wire (payload + trailer, equal to a message built independently with
the reference pack and zlib) and land exactly the source KV. That byte identity is what lets a
CUDA prefill pool hand off to a CPU decode pool and back. The ``gpu`` cases repeat it with CUDA
caches (CUDA -> CUDA direct over UCX and staged over TCP, CUDA -> CPU, CPU -> CUDA); they skip
without a GPU.
"""
from __future__ import annotations

import itertools
import logging
import struct
import time
import zlib

import pytest
import torch

from cleave.v1.inference_pb2 import Layout
from common.model import CacheConfig
from engine.kv_cache import allocate_kv_cache
from kernels.kv_copy import kv_pack as reference_pack
from kvtransfer.crc import CHUNK, crc32, crc32_torch
from kvtransfer.fake import FakeFabric
from kvtransfer.handoff import KVReceiver, KVSender, compat_hash
from kvtransfer.transport import make_transport
from tests.handoff_setup import (BLOCK, DECODE_BLOCKS, MODEL, NUM_BLOCKS, PREFILL_BLOCKS, SENTINEL,
                                 RecordingTransport, expected_decode_cache, make_landing)

pytestmark = pytest.mark.timeout(60)
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOKENS = 11                                         # partial last block


def _random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make_cache(model, seed: int | None, device="cpu") -> torch.Tensor:
    kv = allocate_kv_cache(model, CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS))
    if seed is None:
        kv.fill_(SENTINEL)
    else:
        kv.copy_(torch.randn(kv.shape, generator=torch.Generator().manual_seed(seed)))
    return kv.to(device)


def _reference_message(prefill: torch.Tensor, tokens: int) -> bytes:
    """The one message of a tp1 -> tp1 handoff, built without kvtransfer: the reference pack,
    then magic, protocol 1, zlib CRC-32 and has_crc=1."""
    payload = reference_pack(prefill.cpu(), PREFILL_BLOCKS, 0, tokens, 0, prefill.shape[0], 0,
                             prefill.shape[4]).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return payload + struct.pack("<IIII", 0x564B4C43, 1, zlib.crc32(payload), 1)


# ---- the device CRC --------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("n", [0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 10_000])
def test_torch_crc_equals_zlib(n):
    data = _random_bytes(n, seed=n)
    want = zlib.crc32(data.numpy())
    assert crc32_torch(data) == want
    assert crc32_torch(data, slice_bytes=CHUNK) == want      # many slices, odd chunk counts
    assert crc32(data) == want


@pytest.mark.unit
def test_crc_of_other_dtypes_is_over_their_bytes():
    for t in (torch.randn(3, 5, 7).to(torch.bfloat16), torch.randn(4, 9), torch.arange(300)):
        want = zlib.crc32(t.view(torch.uint8).numpy().tobytes())
        assert crc32(t) == crc32_torch(t) == want
    assert crc32_torch(torch.zeros(1 << 16, dtype=torch.uint8)) == zlib.crc32(bytes(1 << 16))


@pytest.mark.unit
def test_crc_rejects_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        crc32(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="multiple of 256"):
        crc32_torch(_random_bytes(10), slice_bytes=100)


# ---- transports say which memory they move ------------------------------------------------

def _transport(name: str, fabric: FakeFabric | None = None):
    return make_transport(name, **({"fabric": fabric or FakeFabric()} if name == "fake" else {}))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["fake", "tcp", "ucx"])
def test_supports_device_and_rejects_memory_it_cannot_move(name):
    transport = _transport(name)
    try:
        assert transport.supports_device("cpu") and transport.supports_device(torch.device("cpu"))
        assert not transport.supports_device("meta")
        if name != "ucx" or not torch.cuda.is_available():
            assert not transport.supports_device("cuda")
        with pytest.raises(ValueError, match=f"the {name} transport cannot move memory on meta"):
            transport.post_recv(1, torch.empty(8, dtype=torch.uint8, device="meta"), time.time() + 5)
    finally:
        transport.close()


@pytest.mark.unit
def test_ucx_cuda_transports_are_read_from_the_context_resources():
    from kvtransfer.ucx import cuda_transports
    info = ("#      resource 0  :  md 0  dev 0  flags -- self/memory\n"
            "#      resource 1  :  md 1  dev 1  flags -- tcp/lo\n"
            "#      resource 5  :  md 4  dev 0  flags -- cuda_copy/cuda\n"
            "#      resource 6  :  md 5  dev 2  flags -- cuda_ipc/cuda\n")
    assert cuda_transports(info) == ["cuda_copy/cuda", "cuda_ipc/cuda"]
    assert cuda_transports(info.split("#      resource 5")[0]) == []


# ---- direct and staged paths put the same bytes on the wire ----------------------------------

def _handoff(name: str, prefill: torch.Tensor, decode: torch.Tensor, model, stage_send: bool,
             stage_recv: bool, transfer_id: str) -> tuple[list[bytes], KVSender, KVReceiver]:
    """One tp1 -> tp1 handoff of TOKENS tokens; returns the wire messages (host bytes)."""
    compat = compat_hash("tiny", model, BLOCK)
    wire: list[bytes] = []
    fabric = FakeFabric()
    src = RecordingTransport(_transport(name, fabric), tamper=lambda b: wire.append(b.cpu().numpy().tobytes()))
    dst = _transport(name, fabric)
    try:
        receiver = KVReceiver(dst, decode, model, Layout(tp=1, pp=1), force_staging=stage_recv)
        receiver.expect(transfer_id, Layout(tp=1, cp=1), TOKENS, time.time() + 20)
        sender = KVSender(src, model, compat, Layout(tp=1, cp=1), force_staging=stage_send)
        sender.push(make_landing(transfer_id, TOKENS, {0: dst.address()}, compat=compat), prefill, PREFILL_BLOCKS)
        receiver.wait(transfer_id, DECODE_BLOCKS)
    finally:
        src.close()
        dst.close()
    return wire, sender, receiver


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tcp", "ucx"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_staged_and_direct_paths_send_identical_bytes_and_land_the_source(name, dtype):
    model = MODEL.replace(dtype=dtype)
    prefill = make_cache(model, seed=3)
    want_wire = _reference_message(prefill, TOKENS)
    want_kv = expected_decode_cache(prefill, make_cache(model, seed=None), TOKENS)
    for i, (stage_send, stage_recv) in enumerate(itertools.product([False, True], repeat=2)):
        decode = make_cache(model, seed=None)
        wire, sender, receiver = _handoff(name, prefill, decode, model, stage_send, stage_recv, f"t{i}")
        assert wire == [want_wire], f"send staged={stage_send}"
        assert torch.equal(decode, want_kv), f"send staged={stage_send}, receive staged={stage_recv}"
        assert sender.path(prefill.device).direct is not stage_send
        assert receiver.path.direct is not stage_recv


@pytest.mark.unit
def test_each_path_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="kvtransfer.handoff")
    prefill = make_cache(MODEL, seed=1)
    for i in range(2):
        _handoff("fake", prefill, make_cache(MODEL, seed=None), MODEL, True, False, f"log{i}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("KV handoff (decode rank 0): host memory over FAKE") == 2     # a receiver each
    staged = [m for m in lines if m.startswith("KV handoff (prefill rank 0): staged through a host buffer "
                                               "(cpu <-> host) over FAKE: staging forced")]
    assert len(staged) == 2, lines                                                  # a sender each
    sender = KVSender(_transport("fake"), MODEL, "x", Layout(tp=1, cp=1))
    caplog.clear()
    assert sender.path("cpu") is sender.path(torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == ["KV handoff (prefill rank 0): host memory over FAKE"]
    sender.transport.close()


# ---- on a GPU -----------------------------------------------------------------------------

@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("n", [1, 4095, 1 << 20, (8 << 20) + 3])
def test_cuda_crc_equals_zlib(n):
    data = _random_bytes(n, seed=n)
    assert crc32(data.cuda()) == zlib.crc32(data.numpy())


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("name,src_dev,dst_dev", [
    ("ucx", "cuda", "cuda"), ("tcp", "cuda", "cuda"), ("ucx", "cuda", "cpu"), ("ucx", "cpu", "cuda"),
    ("tcp", "cuda", "cpu")])
def test_cuda_handoff_matches_the_cpu_wire_format(name, src_dev, dst_dev):
    model = MODEL.replace(dtype="bfloat16")
    prefill = make_cache(model, seed=5, device=src_dev)
    decode = make_cache(model, seed=None, device=dst_dev)
    wire, sender, receiver = _handoff(name, prefill, decode, model, False, False, "gpu")
    assert wire == [_reference_message(prefill, TOKENS)]
    assert torch.equal(decode.cpu(), expected_decode_cache(prefill.cpu(), make_cache(model, seed=None), TOKENS))
    for side, path in (("sender", sender.path(prefill.device)), ("receiver", receiver.path)):
        transport = sender.transport if side == "sender" else receiver.transport
        assert path.direct is transport.supports_device(path.device), side
    if name == "tcp":
        assert not sender.path(prefill.device).direct and not receiver.path.direct
