"""Tokens from the decode scheduler's thread to the ``Decode`` streams on the event loop.

The scheduler thread calls each sequence's ``emit`` once per token (``engine.scheduler``); a
decode step over B sequences makes B emits in a row. Waking the event loop once per emit
(``call_soon_threadsafe``: a self-pipe write and a loop iteration each) costs the decode
instance's core B wake-ups per step; :class:`TokenRelay` gathers the emits and wakes the loop
once for all that arrived before it ran, so a step's tokens reach their streams together.

Who calls what: ``DecodeService.Decode`` makes a queue per stream and hands the scheduler
``relay.emitter(queue)``; the scheduler thread (or any thread finishing a sequence) calls it;
the loop puts each item into its queue in emit order. Emit never blocks: backpressure from a
slow reader never reaches the decode step (the router reads every stream eagerly and bounds
each client's buffer, ``router.readahead``).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable


class TokenRelay:
    """Batches cross-thread puts into asyncio queues: one loop wake-up per burst of emits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []
        self._scheduled = False     # a drain is queued on the loop and has not taken the list yet

    def emitter(self, queue: asyncio.Queue) -> Callable[[int | None, str | None, object], None]:
        """The ``emit(token, reason, logprob)`` callback of one sequence: its items go to ``queue``."""
        return lambda token, reason, logprob: self.put(queue, (token, reason, logprob))

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        """Queue ``item`` for ``queue`` from any thread; raises RuntimeError once the loop is closed."""
        with self._lock:
            self._pending.append((queue, item))
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
        for queue, item in items:
            queue.put_nowait(item)
