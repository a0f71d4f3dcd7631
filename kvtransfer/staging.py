"""Where a KV message lives while it moves: in the KV cache's own memory, or staged on the host.

``kvtransfer.handoff`` makes one :class:`MessagePath` per (transport, KV cache device): the
decode rank's :class:`~kvtransfer.handoff.KVReceiver` when it is built, the prefill rank's
:class:`~kvtransfer.handoff.KVSender` on its first push from a cache on that device. The path
is decided once and logged once:

* **direct**: the transport moves the cache device's memory itself
  (:meth:`~kvtransfer.transport.KVTransport.supports_device`; host memory always, CUDA memory
  over UCX built with CUDA). Messages are allocated on the cache's device, packed in place and
  handed to the transport as they are.
* **staged**: the transport moves host memory only (TCP, fake, UCX without CUDA), or staging
  was forced. Messages are host buffers (pinned when the cache is on CUDA, so copies are
  asynchronous); the sender packs on the device and copies the payload down
  (:meth:`MessagePath.to_host`), the receiver copies the landed payload up before scattering
  it (:meth:`MessagePath.to_device`). On CUDA both copies run on a side stream of this path,
  ordered after the work that produced their input, so the copy waits for nothing queued on
  the compute stream later.

The bytes on the wire are the same on both paths (payload then trailer), which is what lets a
CUDA prefill pool hand off to a CPU decode pool and back.

Plain host messages (a CPU cache) come from a :class:`HostBufferPool` of the path: a fresh
buffer of tens of MiB costs a page fault per 4 KiB on first touch (here 2-3x the time of the
copy itself), so buffers given back with :meth:`MessagePath.release` are reused. Device and
pinned buffers come from torch's own caching allocators.
"""
from __future__ import annotations

import threading
import weakref

import torch

from kvtransfer.transport import KVTransport

MiB = 1 << 20
POOL_BYTES = 256 * MiB      # idle host message memory a path keeps for reuse, at most
_ROUND = MiB                # pooled buffers are sized in whole MiB, so similar messages share


class HostBufferPool:
    """Reusable uint8 host buffers. :meth:`take` hands out the first ``nbytes`` of a pooled buffer
    (the smallest that fits without wasting more than its request plus 1 MiB) or of a new one;
    :meth:`give_back` returns it once nothing reads or writes it any more (its transfer is DONE;
    a failed or aborted transfer's buffer is never given back, the transport may still use it).
    Keeps at most ``max_bytes`` of idle buffers, dropping the oldest. Thread-safe."""

    def __init__(self, max_bytes: int = POOL_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []          # oldest first
        # data_ptr of a handed-out view -> its buffer, weakly: a buffer never given back (its
        # transfer failed) is freed with the last view the transport holds, not kept here
        self._lent: dict[int, weakref.ref] = {}

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._idle if nbytes <= b.numel() <= 2 * nbytes + _ROUND]
            buf = min(fits, key=torch.Tensor.numel) if fits else None
            if buf is not None:
                self._idle = [b for b in self._idle if b is not buf]
        if buf is None:
            buf = torch.empty(-(-max(nbytes, 1) // _ROUND) * _ROUND, dtype=torch.uint8)
        view = buf[:nbytes]
        with self._lock:
            if len(self._lent) > 64:
                self._lent = {p: r for p, r in self._lent.items() if r() is not None}
            self._lent[view.data_ptr()] = weakref.ref(buf)
        return view

    def give_back(self, view: torch.Tensor) -> None:
        """Return a buffer :meth:`take` handed out (anything else is ignored)."""
        with self._lock:
            ref = self._lent.pop(view.data_ptr(), None)
            buf = None if ref is None else ref()
            if buf is None:
                return
            self._idle.append(buf)
            while self._idle and sum(b.numel() for b in self._idle) > self.max_bytes:
                self._idle.pop(0)

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)


class MessagePath:
    """How messages of one KV cache device travel over one transport (see the module doc).

    Raises ``ValueError`` for a device torch does not know."""

    def __init__(self, transport: KVTransport, device: torch.device | str,
                 force_staging: bool = False, pool_bytes: int = POOL_BYTES) -> None:
        """``pool_bytes``: idle host message memory kept for reuse (plain host messages only)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.transport_name = transport.name or type(transport).__name__
        self.direct = not force_staging and transport.supports_device(self.device)
        self.forced = force_staging
        self._side: torch.cuda.Stream | None = None   # created on first staged CUDA copy
        self.pool = HostBufferPool(pool_bytes) if self.device.type == "cpu" else None

    @property
    def on_host(self) -> bool:
        """Whether messages are host buffers (a CPU cache, or a staged path)."""
        return self.device.type == "cpu" or not self.direct

    def describe(self) -> str:
        """One line for the log: which memory the KV bytes go through, and why."""
        over = f"over {self.transport_name.upper()}"
        if self.device.type == "cpu" and not self.forced:
            return f"host memory {over}"
        if self.direct:
            return f"direct device memory ({self.device}) {over}"
        kind = "pinned host memory" if self.device.type == "cuda" else "a host buffer"
        why = ("staging forced" if self.forced else
               f"the {self.transport_name} transport cannot move {self.device.type} memory")
        return f"staged through {kind} ({self.device} <-> host) {over}: {why}"

    def alloc(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 message buffer of ``nbytes``, where this path's messages live.
        Give it back with :meth:`release` once its transfer is done."""
        if self.pool is not None:
            return self.pool.take(nbytes)
        if not self.on_host:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def release(self, message: torch.Tensor) -> None:
        """``message`` (from :meth:`alloc`) is no longer used by anyone: pooled for reuse when it
        is a plain host buffer, else left to torch's allocators. Call only once its transfer
        is DONE (never for a failed or aborted one: the transport may still touch it)."""
        if self.pool is not None:
            self.pool.give_back(message)

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy ``src`` (on this device, written by work on the current stream) into the host
        buffer ``dst``; returns once ``dst`` holds the bytes."""
        if src.device.type != "cuda":
            dst.copy_(src)
            return
        side, current = self._side_stream(), torch.cuda.current_stream(src.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
        src.record_stream(side)
        side.synchronize()

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        """``src`` (a host tensor) on this device; work queued afterwards on the current stream
        sees the copy complete."""
        if self.device.type != "cuda":
            return src.to(self.device)
        side, current = self._side_stream(), torch.cuda.current_stream(self.device)
        with torch.cuda.stream(side):
            out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            out.copy_(src, non_blocking=True)
        current.wait_stream(side)
        out.record_stream(current)
        return out

    def ready(self, message: torch.Tensor) -> None:
        """Block until every write to a device ``message`` queued on the current stream is done
        (the transport reads device memory outside torch's stream order). No-op on the host."""
        if message.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(message.device))
            event.synchronize()

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        return self._side
