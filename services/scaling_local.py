"""The local scaling backend: pools of ``cleave worker`` processes of one ``LocalStack``.

``cleave serve --planner`` (``services.serve.run_stack``) starts a :class:`PlannerThread`
once the stack is ready. The thread runs ``services.planner.Planner`` on its own event loop
with a :class:`LocalBackend`, which

- grows a pool with ``LocalStack.add_worker`` — the new process loads the model, registers in
  Redis and the routers route to it from their next registry read;
- shrinks a pool with ``LocalStack.retire_worker`` — SIGTERM to its newest instance, which
  marks itself draining, finishes its requests and exits (``services.worker``).

The replica count is the number of instances started and not asked to stop, registered or not.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from common.config import POOLS
from services.launcher import LocalStack
from services.planner import Planner, PlannerConfig

log = logging.getLogger(__name__)


class LocalBackend:
    """A ScalingBackend over one LocalStack (see ``services.scaling``)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def replicas(self, pool: str) -> int:
        return len(self.stack.workers(pool))

    def scale(self, pool: str, replicas: int) -> None:
        if pool not in POOLS or replicas < 0:
            raise ValueError(f"cannot scale pool {pool!r} to {replicas}")
        while self.replicas(pool) < replicas:
            log.info("local backend: starting %s", self.stack.add_worker(pool))
        while self.replicas(pool) > replicas:
            log.info("local backend: draining %s", self.stack.retire_worker(pool))

    def close(self) -> None:
        pass


class PlannerThread:
    """A planner in a daemon thread of the launcher process; ``stop()`` ends it within a round."""

    def __init__(self, stack: LocalStack, cfg: PlannerConfig, key_prefix: str = "cleave:") -> None:
        self.stack = stack
        self.planner = Planner(cfg, LocalBackend(stack), stack.redis_url, key_prefix)  # .history: its changes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="planner", daemon=True)

    def start(self) -> "PlannerThread":
        self._thread.start()
        self._started.wait(10)
        return self

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self.planner.run(self._stop)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
