"""One owner for a request's state in the router: the states of DESIGN §4, the transitions
allowed between them, the one recorder of each request, and claims on workers' counters.

* :class:`RequestState`: ``queued → prefilling → transferring → decoding → finished`` or
  ``failed`` / ``cancelled``. A retry (another attempt after a worker failure) goes back to
  ``prefilling`` from any running state; every non-terminal state may end in any terminal one
  (a first token that is EOS finishes from ``prefilling``, a stop string in it from
  ``transferring``).
* :class:`RequestRecorder`: created by ``RouterCore.generate`` per request and handed to its
  ``RequestRun``; the only code that writes ``state`` to the request hash
  (``router.state.RequestStore``). A transition :data:`ALLOWED` does not list raises
  :class:`IllegalTransition` (a bug, caught by the tests).
* :func:`claim`: what a request has in progress on a worker (``inflight`` and
  ``inflight_tokens``, which routing reads), given back on every exit path, or earlier by
  ``release()``.
"""
from __future__ import annotations

import enum


class RequestState(str, enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})
_RUNNING = (RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING)
ALLOWED: dict[RequestState, frozenset[RequestState]] = {
    RequestState.QUEUED: frozenset({RequestState.PREFILLING}) | TERMINAL_STATES,
    # PREFILLING -> DECODING: a decode instance prefilled the prompt itself (no transfer)
    RequestState.PREFILLING: frozenset({RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING})
    | TERMINAL_STATES,
    RequestState.TRANSFERRING: frozenset({RequestState.DECODING, RequestState.PREFILLING}) | TERMINAL_STATES,
    RequestState.DECODING: frozenset({RequestState.PREFILLING}) | TERMINAL_STATES,
    **{s: frozenset() for s in TERMINAL_STATES},
}


class IllegalTransition(ValueError):
    """A request was moved between two states DESIGN §4 does not connect."""


class RequestRecorder:
    """The state of one request and the one place that records it (see the module docstring).
    ``store``: the router's ``RequestStore`` (writes are queued, never awaited)."""

    def __init__(self, store, request_id: str) -> None:
        self.store, self.request_id = store, request_id
        self.state: RequestState | None = None

    def to(self, state: RequestState, **fields) -> None:
        """Move to ``state`` and record it with ``fields``. Raises IllegalTransition."""
        if self.state is None and state is not RequestState.QUEUED:
            raise IllegalTransition(f"request {self.request_id} must start queued, not {state.value}")
        if self.state is not None and state not in ALLOWED[self.state]:
            raise IllegalTransition(f"request {self.request_id}: {self.state.value} -> {state.value} is not "
                                    f"a transition of DESIGN §4")
        self.state = state
        self.store.update(self.request_id, state=state.value, **fields)

    def note(self, **fields) -> None:
        """Record fields that do not change the state (first-token time, ...)."""
        if "state" in fields:
            raise IllegalTransition("a state is recorded with to(), not note()")
        self.store.update(self.request_id, **fields)


class Claim:
    """``tokens`` of work this request has on ``worker`` (``router.workers.WorkerHandle``),
    counted in its ``inflight`` / ``inflight_tokens`` from construction to :meth:`release`
    (idempotent; also on leaving the ``with`` block)."""

    def __init__(self, worker, tokens: int) -> None:
        self.worker, self.tokens, self.held = worker, tokens, True
        worker.inflight += 1
        worker.inflight_tokens += tokens

    def release(self) -> None:
        if self.held:
            self.held = False
            self.worker.inflight -= 1
            self.worker.inflight_tokens -= self.tokens

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(worker, tokens: int) -> Claim:
    """A :class:`Claim` of ``tokens`` on ``worker`` (use as a context manager)."""
    return Claim(worker, tokens)


class AdmissionQueue:
    """Requests of this router waiting for KV room, at most ``bound`` (``max_queued``)."""

    def __init__(self, bound: int) -> None:
        self.bound, self.waiting = bound, 0

    def wait(self) -> "_Waiting":
        """Join the queue; leave it with ``release()``. Raises Exhausted when it is full."""
        from common.errors import Exhausted
        if self.waiting >= self.bound:
            raise Exhausted(f"all decode instances are full and {self.waiting} requests are already "
                            f"waiting; retry later")
        self.waiting += 1
        return _Waiting(self)


class _Waiting:
    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue, self.held = queue, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.queue.waiting -= 1
