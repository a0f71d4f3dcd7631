"""One interface for moving KV bytes between ranks, with backends chosen by name.

Who calls what (DESIGN §4):

* A **decode rank** owns a receiving transport. At reserve time it publishes
  ``transport.address()`` in the landing descriptor and calls ``post_recv(tag, buf, deadline)``
  for every message it expects (the handoff layer derives ``tag`` from the transfer id and
  piece index, and sizes ``buf`` exactly).
* A **prefill rank** owns a sending transport. After prefill it calls
  ``send(peer_address, tag, buf, deadline)`` once per message.
* Both sides poll or wait on the returned :class:`Transfer` handle. A handle always ends
  ``DONE`` or ``FAILED``: the transport fails it when ``deadline`` (unix seconds) passes, when
  ``abort()`` is called, or when the peer cannot be reached.

Buffers are contiguous torch tensors of any dtype; only their bytes move. Every backend moves
host (CPU) memory; :meth:`KVTransport.supports_device` says whether it can also send from and
receive into another device's memory (``ucx`` built with CUDA: CUDA IPC on one host, RDMA
across hosts). ``kvtransfer.handoff`` asks it once per KV cache and otherwise stages device
memory through pinned host buffers.

The backends: ``ucx`` (``ucxx``, worker-address endpoints so shared memory is used on one
host), ``tcp`` (plain sockets, no extra dependency) and ``fake`` (in-process, for unit tests,
needs a shared :class:`~kvtransfer.fake.FakeFabric` passed as ``fabric=``).
"""
from __future__ import annotations

import abc
import enum
import importlib

import torch


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransportError(RuntimeError):
    """A transport could not be created or used (bad address, missing dependency, ...)."""


class Transfer(abc.ABC):
    """Handle of one message in flight, a small state machine: PENDING -> DONE | FAILED."""

    @abc.abstractmethod
    def poll(self) -> TransferState:
        """Current state, without blocking."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> TransferState:
        """Block until terminal or ``timeout`` seconds pass; returns the state then."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Cancel if still pending (state becomes FAILED); no-op when terminal."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the transfer failed, for FAILED handles; else None."""


class KVTransport(abc.ABC):
    """A rank's endpoint for KV messages. Thread-safe: methods may be called from any thread."""

    name: str = ""

    @abc.abstractmethod
    def address(self) -> bytes:
        """Opaque address a peer passes to :meth:`send` to reach this transport."""

    @abc.abstractmethod
    def post_recv(self, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        """Receive the message sent with ``tag`` into ``buffer`` (exactly its size)."""

    @abc.abstractmethod
    def send(self, peer: bytes, tag: int, buffer: torch.Tensor, deadline: float) -> Transfer:
        """Send ``buffer``'s bytes to the transport at ``peer`` under ``tag``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Fail every pending transfer and release resources. Idempotent."""

    def supports_device(self, device: torch.device | str) -> bool:
        """Whether :meth:`send` / :meth:`post_recv` take buffers on ``device`` as they are.

        Host memory always; the default says host memory only, and :meth:`send` /
        :meth:`post_recv` raise ``ValueError`` for a buffer on a device this returns False for."""
        return torch.device(device).type == "cpu"


_BACKENDS = {
    "ucx": "kvtransfer.ucx:UCXTransport",
    "tcp": "kvtransfer.tcp:TCPTransport",
    "fake": "kvtransfer.fake:FakeTransport",
}


def make_transport(name: str, **options) -> KVTransport:
    """Create the backend called ``name``; its module is imported only now."""
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {sorted(_BACKENDS)}") from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransportError(f"KV transport {name!r} needs a missing dependency: {exc}") from exc
    return getattr(module, cls_name)(**options)


def available_transports() -> list[str]:
    return sorted(_BACKENDS)
