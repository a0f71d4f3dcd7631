"""In-process KV transport for unit tests: ``make_transport("fake", fabric=FakeFabric())``.

Tests create one :class:`FakeFabric` and pass it to every :class:`FakeTransport` that should
reach the others (there is no module-global registry). A send waits in the receiver's inbox
until a matching ``post_recv`` (same tag) appears; then the bytes are copied on the caller's
thread and both handles end DONE. Like the real backends: sizes must match exactly (else both
handles FAIL), an unknown address fails the send at once, deadlines and ``abort()`` fail a
pending handle, and ``close()`` fails everything pending on and towards the transport.
Deadlines are checked whenever a handle is polled or waited on (there is no thread).
"""
from __future__ import annotations

import itertools
import threading

import torch

from kvtransfer.transfer_base import Handle, byte_view, check_message, closed_error
from kvtransfer.transport import KVTransport, Transfer, TransferState


class FakeFabric:
    """The 'network' shared by fake transports of one test: address -> transport."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.transports: dict[bytes, FakeTransport] = {}
        self._ids = itertools.count()

    def attach(self, transport: "FakeTransport") -> bytes:
        with self.lock:
            address = f"fake:{next(self._ids)}".encode()
            self.transports[address] = transport
            return address

    def detach(self, address: bytes) -> None:
        with self.lock:
            self.transports.pop(address, None)


class FakeTransport(KVTransport):
    name = "fake"

    def __init__(self, fabric: FakeFabric | None = None, host: str = "") -> None:  # host: unused
        if not isinstance(fabric, FakeFabric):
            raise ValueError(f"fake transport needs fabric=FakeFabric(), got {fabric!r}")
        self._fabric = fabric
        self._address = fabric.attach(self)
        self._closed = False
        # tag -> (handle, buffer) posted here; tag -> list of (handle, buffer) sent here.
        self._posted: dict[int, tuple[Handle, torch.Tensor]] = {}
        self._inbox: dict[int, list[tuple[Handle, torch.Tensor]]] = {}

    def address(self) -> bytes:
        return self._address

    def post_recv(self, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        handle = Handle("recv", tag, deadline, on_cancel=self._forget_recv)
        with self._fabric.lock:
            if self._closed:
                handle.fail(closed_error("recv", tag))
                return handle
            if tag in self._posted:
                raise ValueError(f"tag {tag:#x} already has a posted receive on {self._address!r}")
            self._posted[tag] = (handle, buffer)
            self._deliver(tag)
        return handle

    def send(self, peer: bytes, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        with self._fabric.lock:
            target = self._fabric.transports.get(peer)
            on_cancel = None if target is None else target._forget_send
            handle = Handle("send", tag, deadline, on_cancel=on_cancel)
            if self._closed:
                handle.fail(closed_error("send", tag))
            elif target is None:
                handle.fail(f"send tag={tag:#x}: no fake transport at address {peer!r}")
            else:
                target._inbox.setdefault(tag, []).append((handle, buffer))
                target._deliver(tag)
        return handle

    def close(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            self._closed = True
            self._fabric.detach(self._address)
            for handle, _ in self._posted.values():
                handle.fail(closed_error("recv", handle.tag))
            for queue in self._inbox.values():
                for handle, _ in queue:
                    handle.fail(f"send tag={handle.tag:#x} failed: peer {self._address!r} closed")
            self._posted.clear()
            self._inbox.clear()

    # ---- internals (called with the fabric lock held) ------------------------------------
    def _deliver(self, tag: int) -> None:
        while tag in self._posted and self._inbox.get(tag):
            recv_handle, dst = self._posted.pop(tag)
            if recv_handle.poll() is not TransferState.PENDING:
                continue
            send_handle, src = self._inbox[tag].pop(0)
            if send_handle.poll() is not TransferState.PENDING:
                self._posted[tag] = (recv_handle, dst)
                continue
            if src.nbytes != dst.nbytes:
                msg = (f"tag={tag:#x} size mismatch: message has {src.nbytes} bytes, "
                       f"posted buffer has {dst.nbytes} bytes")
                recv_handle.fail(f"recv {msg}")
                send_handle.fail(f"send {msg}")
            else:
                byte_view(dst)[:] = byte_view(src)
                recv_handle.finish()
                send_handle.finish()
        if not self._inbox.get(tag):
            self._inbox.pop(tag, None)

    def _forget_recv(self, handle: Handle) -> None:
        with self._fabric.lock:
            if self._posted.get(handle.tag, (None,))[0] is handle:
                del self._posted[handle.tag]

    def _forget_send(self, handle: Handle) -> None:
        with self._fabric.lock:
            queue = self._inbox.get(handle.tag, [])
            queue[:] = [entry for entry in queue if entry[0] is not handle]
