"""UCX KV transport over ``ucxx``'s low-level API: ``make_transport("ucx")``.

Each :class:`UCXTransport` owns its own ``UCXContext`` and ``UCXWorker`` (nothing is
process-global, so a sender and a receiver can live in one process) and one progress thread,
the only thread that touches UCX objects after construction. ``send`` / ``post_recv`` / aborts
are queued to that thread as commands; the thread runs them, drives ``worker.progress()``,
completes handles and sweeps deadlines.

* ``address()`` is ``b"CKVU1:" + worker address``. Peers create endpoints from it with
  ``endpoint_error_handling=False``, which lets UCX use shared memory on one host (the listener
  path with error handling falls back to TCP). Without UCX's peer-failure handling a vanished
  peer is detected by deadlines only. One endpoint is cached per peer address. The prefix
  guards UCX, which aborts the whole process on a malformed worker address.
* Receives are matched by probing: for each posted tag the thread calls
  ``worker.tag_probe(tag, remove=True)`` (full 64-bit mask) and, once the message is there,
  ``worker.tag_recv_with_handle`` into the posted buffer. So a receive is not handed to UCX
  before its message arrives, which makes aborting an unmatched receive trivial and lets a size
  mismatch be reported (the message is drained into scratch memory) instead of truncated.
  Messages nobody posts for are dropped after ``unexpected_hold_s`` seconds.
* UCX cannot cancel a rendezvous send once its peer has been told about it, and ucxx exposes
  no per-request cancel. An aborted or expired handle therefore FAILS at once, but its UCX
  request stays in flight (its buffer kept alive here) until UCX completes it or the transport
  closes; a peer posting that tag later still receives the bytes.
* Device memory: when this UCX build has CUDA transports (``cuda_copy``, ``cuda_ipc``: the
  context's resources, :func:`cuda_transports`) and its ``TLS`` allows them,
  :meth:`UCXTransport.supports_device` is True for CUDA devices and CUDA tensors are handed to
  UCX as they are (``__cuda_array_interface__``): CUDA IPC on one host, RDMA across hosts. The
  caller must have finished writing a send buffer (synchronised its stream) before ``send``.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx._lib.libucxx as ucx_api  # noqa: E402  (after the env default above)
from ucxx._lib.arr import Array  # noqa: E402

from common.net import interface_of  # noqa: E402
from kvtransfer.transfer_base import Handle, byte_view, check_message, closed_error  # noqa: E402
from kvtransfer.transport import KVTransport, Transfer, TransferState  # noqa: E402

ADDRESS_PREFIX = b"CKVU1:"
SWEEP_S = 0.02           # deadline sweep / unexpected-message check period
IDLE_WAIT_S = 0.05       # how long an idle thread blocks on its command queue
SPINS_BEFORE_SLEEP = 200  # busy progress loops with no progress before napping
NAP_S = 0.0002


def cuda_transports(context_info: str) -> list[str]:
    """Names of the CUDA transports (``cuda_copy/cuda``, ``cuda_ipc/cuda0``...) among the
    resources of a UCX context, from its printed info (``UCXContext.info``). Empty when UCX was
    built without CUDA, its CUDA module could not load (no driver), or ``UCX_TLS`` excludes them.
    (ucxx's own ``cuda_support`` only reflects ``UCX_TLS``.)"""
    found = []
    for line in context_info.splitlines():
        if "resource" in line and "--" in line:
            name = line.rsplit("--", 1)[1].strip()
            if name.startswith("cuda"):
                found.append(name)
    return found


def _ucx_view(buffer: torch.Tensor):
    """What UCX is given for a checked buffer: a zero-copy uint8 numpy view of host memory, or
    the flat uint8 CUDA tensor itself (ucxx reads its ``__cuda_array_interface__``)."""
    if buffer.device.type == "cpu":
        return byte_view(buffer)
    return buffer.reshape(-1).view(torch.uint8)


def _bind_cuda(view) -> None:
    """Make a CUDA buffer's device current on the calling (progress) thread: UCX's CUDA
    transports work in the thread's current CUDA context. No-op for host memory."""
    if isinstance(view, torch.Tensor) and view.is_cuda:
        torch.cuda.set_device(view.device)


class _InFlight:
    """A UCX request and what it must keep alive until UCX is done with the memory."""

    __slots__ = ("handle", "request", "keep", "on_done")

    def __init__(self, handle: Handle | None, request, keep, on_done=None) -> None:
        self.handle, self.request, self.keep, self.on_done = handle, request, keep, on_done


class UCXTransport(KVTransport):
    name = "ucx"

    def __init__(self, unexpected_hold_s: float = 60.0, ucx_config: dict | None = None,
                 host: str = "") -> None:
        """``host``: the address the service binds; UCX's network transports then listen only on
        the interface that owns it (``NET_DEVICES``; shared memory is unaffected). "" or a
        wildcard address leaves UCX's default (every interface). Raises ValueError for a host
        no local interface owns."""
        if not unexpected_hold_s > 0:
            raise ValueError(f"unexpected_hold_s must be positive, got {unexpected_hold_s}")
        self._hold_s = unexpected_hold_s
        config = dict(ucx_config or {})
        device = interface_of(host)
        if device and "NET_DEVICES" not in config and "UCX_NET_DEVICES" not in os.environ:
            config["NET_DEVICES"] = device
        self._context = ucx_api.UCXContext(config_dict=config,
                                           feature_flags=(ucx_api.Feature.TAG,))
        self._worker = ucx_api.UCXWorker(self._context)
        self._address = ADDRESS_PREFIX + self._worker.address.tobytes()
        self._cuda = bool(self._context.cuda_support) and bool(cuda_transports(self._context.info))
        self._lock = threading.Lock()           # guards _closed, _pending, _posted_tags
        self._closed = False
        self._pending: set[Handle] = set()
        self._posted_tags: dict[int, Handle] = {}
        self._commands: queue.Queue[Callable[[], None] | None] = queue.Queue()
        # Owned by the progress thread only:
        self._posted: dict[int, tuple[Handle, np.ndarray]] = {}
        self._inflight: list[_InFlight] = []
        self._endpoints: dict[bytes, object] = {}
        self._unexpected_seen: dict[int, float] = {}
        self._thread = threading.Thread(target=self._progress_loop, name="kv-ucx-progress",
                                         daemon=True)
        self._thread.start()

    def address(self) -> bytes:
        return self._address

    def supports_device(self, device: torch.device | str) -> bool:
        kind = torch.device(device).type
        return kind == "cpu" or (kind == "cuda" and self._cuda)

    def post_recv(self, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        handle = Handle("recv", tag, deadline, on_cancel=self._on_cancel)
        if self._admit(handle, tag):
            view = _ucx_view(buffer)
            self._commands.put(lambda: self._post(tag, handle, view))
        return handle

    def send(self, peer: bytes, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        check_message(self, tag, buffer, deadline)
        if not isinstance(peer, bytes) or not peer.startswith(ADDRESS_PREFIX):
            raise ValueError(f"ucx peer address must start with {ADDRESS_PREFIX!r}, "
                             f"got {peer[:32]!r}")
        handle = Handle("send", tag, deadline)
        if self._admit(handle, None):
            view = _ucx_view(buffer)
            self._commands.put(lambda: self._submit_send(handle, peer, view))
        return handle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, set()
        self._commands.put(None)
        self._thread.join(timeout=5)
        for handle in pending:
            handle.fail(closed_error(handle.kind, handle.tag))
        if not self._thread.is_alive():
            # Drop UCX objects in dependency order: requests, endpoints, worker, context.
            self._inflight.clear()
            self._posted.clear()
            self._endpoints.clear()
            self._worker = self._context = None

    # ---- caller side ---------------------------------------------------------------------
    def _admit(self, handle: Handle, recv_tag: int | None) -> bool:
        with self._lock:
            if self._closed:
                handle.fail(closed_error(handle.kind, handle.tag))
                return False
            if recv_tag is not None:
                if recv_tag in self._posted_tags:
                    raise ValueError(f"tag {recv_tag:#x} already has a posted receive")
                self._posted_tags[recv_tag] = handle
            self._pending.add(handle)
        return True

    def _on_cancel(self, handle: Handle) -> None:
        self._release_tag(handle)    # the tag may be posted again right away
        self._commands.put(lambda: self._forget_posted(handle))

    def _release_tag(self, handle: Handle) -> None:
        with self._lock:
            if self._posted_tags.get(handle.tag) is handle:
                del self._posted_tags[handle.tag]
            self._pending.discard(handle)

    # ---- progress thread -----------------------------------------------------------------
    def _progress_loop(self) -> None:
        idle, next_sweep = 0, 0.0
        while True:
            if not self._run_commands(block=not (self._posted or self._inflight)):
                return
            progressed = self._worker.progress_once()
            progressed |= self._match_posted()
            progressed |= self._reap_inflight()
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_S
            idle = 0 if progressed else idle + 1
            if idle > SPINS_BEFORE_SLEEP:
                time.sleep(NAP_S)

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands; False once close() asked the thread to stop."""
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return True
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _post(self, tag: int, handle: Handle, view) -> None:
        _bind_cuda(view)
        self._posted[tag] = (handle, view)

    def _submit_send(self, handle: Handle, peer: bytes, view) -> None:
        if handle.poll() is not TransferState.PENDING:
            return
        _bind_cuda(view)
        try:
            endpoint = self._endpoints.get(peer)
            if endpoint is None:
                address = ucx_api.UCXAddress.create_from_buffer(peer[len(ADDRESS_PREFIX):])
                endpoint = self._worker.create_endpoint_from_worker_address(address, False)
                self._endpoints[peer] = endpoint
            request = endpoint.tag_send(Array(view), ucx_api.UCXXTag(handle.tag))
        except Exception as exc:  # noqa: BLE001  (any UCX error fails this send only)
            handle.fail(f"send tag={handle.tag:#x} to {peer[:24]!r}...: {exc}")
            return
        self._inflight.append(_InFlight(handle, request, view))

    def _match_posted(self) -> bool:
        matched = False
        for tag, (handle, view) in list(self._posted.items()):
            probe = self._worker.tag_probe(ucx_api.UCXXTag(tag), remove=True)
            if not probe.matched:
                continue
            matched = True
            del self._posted[tag]
            if probe.length != view.nbytes:
                handle.fail(f"recv tag={tag:#x} size mismatch: message has {probe.length} "
                            f"bytes, posted buffer has {view.nbytes} bytes")
            if handle.poll() is not TransferState.PENDING:
                view = np.empty(probe.length, dtype=np.uint8)   # drain, never touch the buffer
            request = self._worker.tag_recv_with_handle(Array(view), probe)
            self._inflight.append(_InFlight(handle, request, view, self._release_tag))
        return matched

    def _reap_inflight(self) -> bool:
        still, reaped = [], False
        for item in self._inflight:
            if not item.request.completed:
                still.append(item)
                continue
            reaped = True
            try:
                item.request.check_error()
            except Exception as exc:  # noqa: BLE001
                if item.handle is not None:
                    item.handle.fail(f"{item.handle.kind} tag={item.handle.tag:#x}: {exc}")
            if item.handle is not None:
                item.handle.finish()
                if item.on_done is not None:
                    item.on_done(item.handle)
        self._inflight = still
        return reaped

    def _forget_posted(self, handle: Handle) -> None:
        if self._posted.get(handle.tag, (None,))[0] is handle:
            del self._posted[handle.tag]

    def _sweep(self, now: float) -> None:
        with self._lock:
            handles = list(self._pending)
        finished = [h for h in handles if h.poll() is not TransferState.PENDING]
        with self._lock:
            self._pending.difference_update(finished)
        self._drop_stale_unexpected(now)

    def _drop_stale_unexpected(self, now: float) -> None:
        """Drain a message at the head of UCX's unexpected queue nobody posted for in time."""
        probe = self._worker.tag_probe(ucx_api.UCXXTag(0), ucx_api.UCXXTagMask(0), remove=False)
        if not probe.matched:
            self._unexpected_seen.clear()
            return
        tag = int(probe.sender_tag.value)
        if tag in self._posted:
            return
        first = self._unexpected_seen.setdefault(tag, now)
        if now - first < self._hold_s:
            return
        probe = self._worker.tag_probe(ucx_api.UCXXTag(tag), remove=True)
        if probe.matched:
            scratch = np.empty(probe.length, dtype=np.uint8)
            request = self._worker.tag_recv_with_handle(Array(scratch), probe)
            self._inflight.append(_InFlight(None, request, scratch))
        self._unexpected_seen.pop(tag, None)
