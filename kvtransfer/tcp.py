"""Plain-socket KV transport, the fallback with no extra dependency: ``make_transport("tcp")``.

Wire format, one frame per message on a long-lived connection (sender -> receiver)::

    magic b"CKV1" | tag u64 | nbytes u64 (network order) | nbytes of payload

Receiving side: the constructor binds a listener on ``host`` port 0 (``address()`` is
``b"host:port"``). One housekeeping thread accepts connections and sweeps deadlines; one reader
thread per connection parses frames and reads each payload straight into the buffer posted
for its tag. A frame whose tag is not posted yet is held in memory until a ``post_recv``
claims it, or dropped after ``hold_s`` seconds or when held bytes would pass
``max_held_bytes``. A size mismatch fails the posted handle and the payload is discarded.

Sending side: one connection and one thread per peer address, created on first ``send``;
``send`` queues and returns. A send is DONE when its bytes are handed to the kernel. Aborting
a send mid-frame closes that connection (the receiver sees a broken frame and fails that
tag); the next send reconnects.
"""
from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time

import torch

from kvtransfer.transfer_base import Handle, byte_view, check_message, closed_error
from kvtransfer.transport import KVTransport, Transfer, TransferState

log = logging.getLogger(__name__)

MAGIC = b"CKV1"
HEADER = struct.Struct("!4sQQ")
CHUNK = 4 << 20          # bytes per socket call, so aborts and closes are noticed
IO_TIMEOUT_S = 0.2       # socket timeout between checks of the closed flag
SWEEP_S = 0.05           # housekeeping period (deadline sweep, held-message expiry)


def parse_address(peer: bytes) -> tuple[str, int]:
    try:
        host, _, port = peer.decode("ascii").rpartition(":")
        if not host:
            raise ValueError
        return host, int(port)
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise ValueError(f"tcp peer address must look like b'host:port', got {peer!r}") from None


class _BrokenFrame(Exception):
    """The connection ended or was closed in the middle of a frame."""


class TCPTransport(KVTransport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", hold_s: float = 30.0,
                 max_held_bytes: int = 256 << 20) -> None:
        if not 0 < hold_s < float("inf") or max_held_bytes < 0:
            raise ValueError(f"need hold_s > 0 and max_held_bytes >= 0, got hold_s={hold_s}, "
                             f"max_held_bytes={max_held_bytes}")
        self._hold_s, self._max_held = hold_s, max_held_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._posted: dict[int, tuple[Handle, torch.Tensor]] = {}
        self._held: dict[int, list[tuple[bytearray, float]]] = {}
        self._held_bytes = 0
        self._pending: set[Handle] = set()
        self._conns: set[socket.socket] = set()
        self._senders: dict[bytes, _PeerSender] = {}
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(SWEEP_S)
        self._address = f"{host}:{self._listener.getsockname()[1]}".encode()
        self._thread = threading.Thread(target=self._housekeep, name="kv-tcp-accept", daemon=True)
        self._thread.start()

    def address(self) -> bytes:
        return self._address

    @property
    def closed(self) -> bool:
        return self._closed

    def post_recv(self, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        handle = Handle("recv", tag, deadline, on_cancel=self._forget_recv)
        with self._lock:
            if self._closed:
                handle.fail(closed_error("recv", tag))
                return handle
            if tag in self._posted:
                raise ValueError(f"tag {tag:#x} already has a posted receive on {self._address!r}")
            held = self._held.get(tag)
            if not held:
                self._posted[tag] = (handle, buffer)
                self._pending.add(handle)
                return handle
            data, _ = held.pop(0)
            if not held:
                del self._held[tag]
            self._held_bytes -= len(data)
        if len(data) != buffer.nbytes:
            handle.fail(_mismatch(tag, len(data), buffer.nbytes))
        else:
            byte_view(buffer)[:] = memoryview(data)
            handle.finish()
        return handle

    def send(self, peer: bytes, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        parse_address(peer)
        handle = Handle("send", tag, deadline)
        with self._lock:
            if self._closed:
                handle.fail(closed_error("send", tag))
                return handle
            sender = self._senders.get(peer)
            if sender is None:
                sender = self._senders[peer] = _PeerSender(self, peer)
            self._pending.add(handle)
        sender.queue.put((handle, byte_view(buffer)))
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, set()
            conns, senders = list(self._conns), list(self._senders.values())
            self._posted.clear()
            self._held.clear()
        for handle in pending:
            handle.fail(closed_error(handle.kind, handle.tag))
        for sender in senders:
            sender.queue.put(None)
        for conn in conns:
            _close_quietly(conn)
        self._thread.join(timeout=2)
        _close_quietly(self._listener)

    # ---- receiving ------------------------------------------------------------------------
    def _housekeep(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                conn = None
            except OSError:
                break
            if conn is not None:
                conn.settimeout(IO_TIMEOUT_S)
                with self._lock:
                    self._conns.add(conn)
                threading.Thread(target=self._read_frames, args=(conn,),
                                 name="kv-tcp-reader", daemon=True).start()
            self._sweep()

    def _sweep(self) -> None:
        with self._lock:
            handles = list(self._pending)
        done = [h for h in handles if h.poll() is not TransferState.PENDING]
        cutoff = time.monotonic() - self._hold_s
        with self._lock:
            self._pending.difference_update(done)
            for tag in list(self._held):
                keep = [(d, t) for d, t in self._held[tag] if t >= cutoff]
                for data, _ in self._held[tag][:len(self._held[tag]) - len(keep)]:
                    self._held_bytes -= len(data)
                    log.warning("dropping unclaimed KV message tag=%#x (%d bytes) after %.1fs",
                                tag, len(data), self._hold_s)
                if keep:
                    self._held[tag] = keep
                else:
                    del self._held[tag]

    def _read_frames(self, conn: socket.socket) -> None:
        try:
            while True:
                header = bytearray(HEADER.size)
                if not self._read_into(conn, memoryview(header), None, eof_ok=True):
                    return
                magic, tag, nbytes = HEADER.unpack(header)
                if magic != MAGIC:
                    log.error("bad KV frame magic %r from %s; closing", bytes(magic), conn)
                    return
                self._read_payload(conn, tag, nbytes)
        except _BrokenFrame as exc:
            if not self._closed:
                log.warning("KV connection ended mid-frame: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close_quietly(conn)

    def _read_payload(self, conn: socket.socket, tag: int, nbytes: int) -> None:
        with self._lock:
            entry = self._posted.pop(tag, None)
        if entry is None:
            self._hold(conn, tag, nbytes)
            return
        handle, buffer = entry
        if buffer.nbytes != nbytes:
            handle.fail(_mismatch(tag, nbytes, buffer.nbytes))
            self._discard(conn, nbytes)
            return
        try:
            self._read_into(conn, memoryview(byte_view(buffer)), handle)
        except _BrokenFrame as exc:
            handle.fail(f"recv tag={tag:#x}: connection broke mid-message ({exc})")
            raise
        handle.finish()

    def _hold(self, conn: socket.socket, tag: int, nbytes: int) -> None:
        with self._lock:
            fits = self._held_bytes + nbytes <= self._max_held
            if fits:
                self._held_bytes += nbytes
        if not fits:
            log.warning("dropping KV message tag=%#x (%d bytes): no receive posted and the "
                        "held-message budget %d bytes is full", tag, nbytes, self._max_held)
            self._discard(conn, nbytes)
            return
        data = bytearray(nbytes)
        self._read_into(conn, memoryview(data), None)
        with self._lock:
            entry = self._posted.pop(tag, None)
            if entry is None:
                self._held.setdefault(tag, []).append((data, time.monotonic()))
                return
            self._held_bytes -= nbytes
        handle, buffer = entry
        if buffer.nbytes != nbytes:
            handle.fail(_mismatch(tag, nbytes, buffer.nbytes))
        else:
            byte_view(buffer)[:] = memoryview(data)
            handle.finish()

    def _discard(self, conn: socket.socket, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, CHUNK)))
        while nbytes:
            step = min(nbytes, len(scratch))
            self._read_into(conn, scratch[:step], None)
            nbytes -= step

    def _read_into(self, conn: socket.socket, view: memoryview, handle: Handle | None,
                   eof_ok: bool = False) -> bool:
        """Fill ``view`` from ``conn``; once ``handle`` is no longer pending, read into scratch."""
        off, scratch = 0, None
        while off < len(view):
            if self._closed:
                raise _BrokenFrame("transport closed")
            target = view[off:off + CHUNK]
            if handle is not None and handle.poll() is not TransferState.PENDING:
                scratch = scratch or memoryview(bytearray(min(CHUNK, len(view))))
                target = scratch[:min(len(scratch), len(view) - off)]
            try:
                n = conn.recv_into(target)
            except socket.timeout:
                continue
            except OSError as exc:
                raise _BrokenFrame(str(exc)) from None
            if n == 0:
                if eof_ok and off == 0:
                    return False
                raise _BrokenFrame(f"peer closed after {off} of {len(view)} bytes")
            off += n
        return True

    def _forget_recv(self, handle: Handle) -> None:
        with self._lock:
            if self._posted.get(handle.tag, (None,))[0] is handle:
                del self._posted[handle.tag]


class _PeerSender:
    """One connection to one peer and the thread that writes frames to it in order."""

    def __init__(self, transport: TCPTransport, peer: bytes) -> None:
        self.transport, self.peer = transport, peer
        self.queue: queue.Queue = queue.Queue()
        self.sock: socket.socket | None = None
        threading.Thread(target=self._run, name="kv-tcp-sender", daemon=True).start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            handle, payload = item
            if handle.poll() is TransferState.PENDING:
                self._send_one(handle, payload)
        if self.sock is not None:
            _close_quietly(self.sock)

    def _send_one(self, handle: Handle, payload) -> None:
        if self.sock is None and not self._connect(handle):
            return
        header = HEADER.pack(MAGIC, handle.tag, payload.nbytes)
        for piece in (memoryview(header), memoryview(payload).cast("B")):
            off = 0
            while off < len(piece):
                if self.transport.closed or handle.poll() is not TransferState.PENDING:
                    self._drop_connection()   # a half-written frame cannot be continued
                    return
                try:
                    off += self.sock.send(piece[off:off + CHUNK])
                except socket.timeout:
                    continue
                except OSError as exc:
                    handle.fail(f"send tag={handle.tag:#x}: connection to {self.peer!r} lost: {exc}")
                    self._drop_connection()
                    return
        handle.finish()

    def _connect(self, handle: Handle) -> bool:
        host, port = parse_address(self.peer)
        budget = max(0.01, min(5.0, handle.deadline - time.time()))
        try:
            sock = socket.create_connection((host, port), timeout=budget)
        except OSError as exc:
            handle.fail(f"send tag={handle.tag:#x}: cannot connect to {self.peer!r}: {exc}")
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT_S)
        self.sock = sock
        return True

    def _drop_connection(self) -> None:
        if self.sock is not None:
            _close_quietly(self.sock)
            self.sock = None


def _mismatch(tag: int, got: int, want: int) -> str:
    return (f"recv tag={tag:#x} size mismatch: message has {got} bytes, "
            f"posted buffer has {want} bytes")


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
