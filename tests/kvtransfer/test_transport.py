"""KV transports (fake, tcp, ucx) behind kvtransfer.transport: semantics every backend shares.

Zero-byte messages are supported and tested. Backend differences the tests allow for: a TCP
send is DONE once its bytes reach the receiver's kernel/held queue, so "peer never posts" only
fails sends on fake and ucx (a 4 MiB ucx message is rendezvous and waits for the receiver).
Payloads compare bit for bit: a transport moves bytes.
"""
import hashlib
import multiprocessing as mp
import time

import pytest
import torch

from kvtransfer.fake import FakeFabric
from kvtransfer.transport import TransferState, make_transport

DONE, FAILED = TransferState.DONE, TransferState.FAILED
BACKENDS = [pytest.param("fake", marks=pytest.mark.unit),
            pytest.param("tcp", marks=pytest.mark.integration),
            pytest.param("ucx", marks=pytest.mark.integration)]
pytestmark = pytest.mark.timeout(60)


def soon(seconds=10.0):
    return time.time() + seconds


@pytest.fixture(params=BACKENDS)
def pair(request):
    """(sender, receiver) transports of one backend; closed after the test."""
    options = {"fabric": FakeFabric()} if request.param == "fake" else {}
    sender = make_transport(request.param, **options)
    receiver = make_transport(request.param, **options)
    yield sender, receiver
    sender.close()
    receiver.close()


def random_bytes(n, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("payload", [
    pytest.param(random_bytes(0), id="0B"), pytest.param(random_bytes(1), id="1B"),
    pytest.param(random_bytes(1 << 20), id="1MiB"),
    pytest.param(torch.randn(3, 5, 7).to(torch.bfloat16), id="bf16")])
def test_round_trip_is_byte_exact(pair, payload):
    sender, receiver = pair
    out = torch.zeros_like(payload)
    recv = receiver.post_recv(42, out, soon())
    send = sender.send(receiver.address(), 42, payload, soon())
    assert recv.wait(10) is DONE, recv.error
    assert send.wait(10) is DONE, send.error
    assert recv.error is None and send.error is None
    assert out.view(torch.uint8).reshape(-1).tolist() == payload.view(torch.uint8).reshape(-1).tolist()


def test_tags_match_in_any_order_before_and_after_post(pair):
    sender, receiver = pair
    tags = [2**64 - 1, 0, 7, 1 << 40, 99, 12345]
    payloads = {tag: random_bytes(1000 + i * 37, seed=i) for i, tag in enumerate(tags)}
    outs = {tag: torch.zeros_like(p) for tag, p in payloads.items()}
    recvs = {tag: receiver.post_recv(tag, outs[tag], soon()) for tag in tags[:3]}
    sends = [sender.send(receiver.address(), tag, payloads[tag], soon()) for tag in reversed(tags)]
    time.sleep(0.1)                               # the last three arrive before their post
    recvs.update({tag: receiver.post_recv(tag, outs[tag], soon()) for tag in tags[3:]})
    for tag in tags:
        assert recvs[tag].wait(10) is DONE, recvs[tag].error
        assert torch.equal(outs[tag], payloads[tag])
    assert all(s.wait(10) is DONE for s in sends)


def test_recv_past_deadline_fails_naming_tag_and_deadline(pair):
    _, receiver = pair
    deadline = time.time() + 0.3
    recv = receiver.post_recv(0xBEEF, torch.zeros(16, dtype=torch.uint8), deadline)
    assert recv.poll() is TransferState.PENDING
    assert recv.wait(5) is FAILED
    assert "0xbeef" in recv.error and f"{deadline:.3f}" in recv.error


def test_unwatched_handle_still_expires(pair):
    _, receiver = pair
    recv = receiver.post_recv(5, torch.zeros(4, dtype=torch.uint8), time.time() + 0.2)
    time.sleep(0.5)
    assert recv._state is FAILED or pair[1].name == "fake"  # fake has no sweeper thread
    assert recv.poll() is FAILED


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "tcp"])
def test_send_to_peer_that_never_posts_fails_at_deadline(backend):
    options = {"fabric": FakeFabric()} if backend == "fake" else {}
    sender, receiver = make_transport(backend, **options), make_transport(backend, **options)
    try:
        send = sender.send(receiver.address(), 3, random_bytes(4 << 20), time.time() + 0.5)
        assert send.wait(5) is FAILED and "deadline" in send.error
    finally:
        sender.close()
        receiver.close()


def test_send_to_vanished_peer_fails(pair):
    sender, receiver = pair
    address = receiver.address()
    receiver.close()
    send = sender.send(address, 3, random_bytes(4 << 20), time.time() + 1.0)
    assert send.wait(5) is FAILED and send.error


def test_abort_fails_and_leaves_buffer_alone(pair):
    sender, receiver = pair
    out = torch.zeros(64, dtype=torch.uint8)
    recv = receiver.post_recv(11, out, soon())
    recv.abort()
    assert recv.poll() is FAILED and "abort" in recv.error
    recv.abort()                                      # no-op once terminal
    sender.send(receiver.address(), 11, random_bytes(64, seed=3), soon())
    time.sleep(0.2)
    assert out.abs().sum() == 0
    again = receiver.post_recv(11, out, soon())       # the tag can be posted again
    assert again.wait(10) is DONE and torch.equal(out, random_bytes(64, seed=3))


def test_size_mismatch_fails_clearly_and_stream_continues(pair):
    sender, receiver = pair
    recv = receiver.post_recv(8, torch.zeros(100, dtype=torch.uint8), soon())
    sender.send(receiver.address(), 8, random_bytes(200), soon())
    assert recv.wait(10) is FAILED
    assert "size mismatch" in recv.error and "200" in recv.error and "100" in recv.error
    out = torch.zeros(10, dtype=torch.uint8)
    follow = receiver.post_recv(9, out, soon())
    sender.send(receiver.address(), 9, random_bytes(10, seed=9), soon())
    assert follow.wait(10) is DONE and torch.equal(out, random_bytes(10, seed=9))


def test_close_fails_pending_and_later_calls(pair):
    _, receiver = pair
    recv = receiver.post_recv(1, torch.zeros(4, dtype=torch.uint8), soon())
    receiver.close()
    receiver.close()                                  # idempotent
    assert recv.poll() is FAILED and "closed" in recv.error
    assert receiver.post_recv(2, torch.zeros(4, dtype=torch.uint8), soon()).poll() is FAILED


def test_bad_input_raises_value_error(pair):
    sender, receiver = pair
    buf = torch.zeros(4)
    with pytest.raises(ValueError):
        receiver.post_recv(-1, buf, soon())
    with pytest.raises(ValueError):
        receiver.post_recv(2**64, buf, soon())
    with pytest.raises(ValueError):
        receiver.post_recv(1, torch.zeros(4, 4).t(), soon())
    receiver.post_recv(1, buf, soon())
    with pytest.raises(ValueError):
        receiver.post_recv(1, buf, soon())            # tag already posted
    if sender.name != "fake":
        with pytest.raises(ValueError):
            sender.send(b"not-an-address", 1, buf, soon())


@pytest.mark.unit
def test_registry_rejects_unknown_names_and_fake_needs_a_fabric():
    with pytest.raises(ValueError, match="nope"):
        make_transport("nope")
    with pytest.raises(ValueError, match="fabric"):
        make_transport("fake")
    fake = make_transport("fake", fabric=FakeFabric())
    assert fake.send(b"fake:999", 1, torch.zeros(1), soon()).poll() is FAILED


# ---- two processes ---------------------------------------------------------------------------
BIG = 64 << 20


def _receiver_process(backend, conn):
    transport = make_transport(backend)
    try:
        conn.send(transport.address())
        out = torch.empty(BIG, dtype=torch.uint8)
        handle = transport.post_recv(77, out, time.time() + 30)
        state = handle.wait(30)
        conn.send((state.value, handle.error, hashlib.sha256(out.numpy()).hexdigest()))
    finally:
        transport.close()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_two_processes_move_64_mib(backend):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_process, args=(backend, child), daemon=True)
    proc.start()
    sender = make_transport(backend)
    try:
        assert parent.poll(30), "receiver did not start"
        address = parent.recv()
        payload = random_bytes(BIG, seed=5)
        send = sender.send(address, 77, payload, time.time() + 30)
        assert send.wait(30) is DONE, send.error
        assert parent.poll(30), "receiver did not report"
        state, error, digest = parent.recv()
        assert state == "done", error
        assert digest == hashlib.sha256(payload.numpy()).hexdigest()
    finally:
        sender.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def _silent_process(backend, conn):
    transport = make_transport(backend)
    conn.send(transport.address())
    time.sleep(60)                                    # never posts; killed by the test


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_killed_peer_process_never_hangs_a_send(backend):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_silent_process, args=(backend, child), daemon=True)
    proc.start()
    sender = make_transport(backend)
    try:
        assert parent.poll(30), "peer did not start"
        address = parent.recv()
        proc.kill()
        proc.join(10)
        send = sender.send(address, 1, random_bytes(4 << 20), time.time() + 1.0)
        assert send.wait(5) is FAILED and send.error
    finally:
        sender.close()
