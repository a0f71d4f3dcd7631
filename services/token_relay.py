"""Tokens from the decode scheduler's thread to the ``Decode`` streams on the event loop.

The scheduler thread calls each sequence's ``emit`` once per token (``engine.scheduler``); a
decode step over B sequences makes B emits in a row. Waking the event loop once per emit
(``call_soon_threadsafe``: a self-pipe write and a loop iteration each) costs the decode
instance's core B wake-ups per step; :class:`TokenRelay` gathers the emits and wakes the loop
once for all that arrived before it ran, so a step's tokens reach their streams together.

Who calls what: ``DecodeService.Decode`` hands the scheduler ``relay.emitter(sink)`` per
sequence, ``sink`` being its call's queue's ``put_nowait`` or its ``Tokens`` stream's
(``services.decode_stream``); the scheduler thread (or any thread finishing a sequence) calls
it; the loop hands each item to its sink in emit order. Emit never blocks: backpressure from a
slow reader never reaches the decode step (the router reads every stream eagerly and bounds
each client's buffer, ``router.readahead``).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable


class TokenRelay:
    """Batches cross-thread hand-overs to the loop: one loop wake-up per burst of emits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[tuple], None], tuple]] = []
        self._scheduled = False     # a drain is queued on the loop and has not taken the list yet

    def emitter(self, sink: Callable[[tuple], None]) -> Callable[[int | None, str | None, object], None]:
        """The ``emit(token, reason, logprob)`` callback of one sequence: its items go to
        ``sink`` (called on the loop, never blocking)."""
        return lambda token, reason, logprob: self.put(sink, (token, reason, logprob))

    def put(self, sink: Callable[[tuple], None], item: tuple) -> None:
        """Hand ``item`` to ``sink`` on the loop, from any thread; raises RuntimeError once
        the loop is closed."""
        with self._lock:
            self._pending.append((sink, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        for sink, item in items:
            sink(item)
