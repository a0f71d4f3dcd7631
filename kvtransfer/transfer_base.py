"""Pieces every KV transport backend shares: the :class:`Handle` state machine and input checks.

Backends (``kvtransfer.ucx``, ``kvtransfer.tcp``, ``kvtransfer.fake``) create one
:class:`Handle` per ``send`` / ``post_recv`` and end it with :meth:`Handle.finish` or
:meth:`Handle.fail` from their own threads. Callers only see the :class:`Transfer` interface.

Deadlines are enforced in two places: lazily, whenever anyone polls or waits on a handle, and
by each backend's background thread (which polls its pending handles), so a handle nobody
looks at still ends. When a handle fails by ``abort()`` or its deadline, the backend's
``on_cancel`` callback runs (outside the handle's lock) so it can forget the message.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import torch

from kvtransfer.transport import KVTransport, Transfer, TransferState

MAX_TAG = (1 << 64) - 1


class Handle(Transfer):
    """A :class:`Transfer` whose terminal state is set once, by whoever gets there first."""

    def __init__(self, kind: str, tag: int, deadline: float,
                 on_cancel: Callable[["Handle"], None] | None = None) -> None:
        self.kind = kind              # "send" or "recv", for messages
        self.tag = tag
        self.deadline = deadline
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._state = TransferState.PENDING
        self._error: str | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} tag={self.tag:#x} {self._state.value}>"

    # ---- called by backends ------------------------------------------------------------
    def finish(self) -> bool:
        """PENDING -> DONE. Returns False (and changes nothing) if already terminal."""
        return self._end(TransferState.DONE, None)

    def fail(self, error: str) -> bool:
        """PENDING -> FAILED with ``error``. Returns False if already terminal."""
        return self._end(TransferState.FAILED, error)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline

    def _end(self, state: TransferState, error: str | None) -> bool:
        with self._cond:
            if self._state is not TransferState.PENDING:
                return False
            self._state, self._error = state, error
            self._cond.notify_all()
            return True

    def _cancel(self, error: str) -> None:
        if self.fail(error) and self._on_cancel is not None:
            self._on_cancel(self)

    def _check_deadline(self) -> None:
        now = time.time()
        if self._state is TransferState.PENDING and now >= self.deadline:
            self._cancel(f"{self.kind} tag={self.tag:#x} missed its deadline {self.deadline:.3f} "
                         f"(now {now:.3f}, {now - self.deadline:.3f}s late)")

    # ---- Transfer interface ----------------------------------------------------------------
    def poll(self) -> TransferState:
        self._check_deadline()
        return self._state

    def wait(self, timeout: float | None = None) -> TransferState:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._state is TransferState.PENDING:
                to_deadline = self.deadline - time.time()
                if to_deadline <= 0:
                    break
                step = to_deadline if end is None else min(to_deadline, end - time.monotonic())
                if step <= 0:
                    return self._state
                self._cond.wait(step)
        self._check_deadline()
        return self._state

    def abort(self) -> None:
        self._cancel(f"{self.kind} tag={self.tag:#x} aborted")

    @property
    def error(self) -> str | None:
        return self._error


def check_message(transport: KVTransport, tag: int, buffer: torch.Tensor, deadline: float) -> None:
    """ValueError quoting the offending value for a bad tag, buffer or deadline, or a buffer
    on a device ``transport`` cannot move (:meth:`KVTransport.supports_device`)."""
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be an int in [0, 2**64), got {tag!r}")
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"buffer must be a torch.Tensor, got {type(buffer).__name__}")
    if not transport.supports_device(buffer.device):
        raise ValueError(f"the {transport.name} transport cannot move memory on {buffer.device}: "
                         f"pass a host (CPU) buffer (kvtransfer.handoff stages device memory "
                         f"through pinned host memory)")
    if not buffer.is_contiguous():
        raise ValueError(f"buffer must be contiguous, got shape {tuple(buffer.shape)} "
                         f"strides {buffer.stride()}")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        raise ValueError(f"deadline must be unix seconds (float), got {deadline!r}")


def byte_view(buffer: torch.Tensor) -> np.ndarray:
    """Zero-copy 1-D uint8 numpy view of a contiguous CPU tensor (bfloat16 included)."""
    flat = buffer.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def closed_error(kind: str, tag: int) -> str:
    return f"{kind} tag={tag:#x} failed: transport closed"
