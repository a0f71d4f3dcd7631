"""Drive a backend with a request list: fixed concurrency or Poisson arrivals, after a warm-up.

* **Concurrency** ``c``: ``c`` clients each send their next request as soon as the previous
  one ends (closed loop).
* **Rate** ``r`` requests/s: arrivals form a Poisson process (exponential gaps of mean
  ``1/r`` s, seeded), each request sent at its arrival time whatever is in flight (open
  loop), optionally capped at ``max_concurrency`` in flight.

The measured window runs from the first send to the last response; warm-up requests (sent
first, one at a time per client, not measured) load the code paths and caches.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from services.loadgen.backends import Timing
from services.loadgen.datasets import BenchRequest


@dataclass(frozen=True)
class LoadConfig:
    """One load level: exactly one of ``concurrency`` and ``rate`` is set."""

    concurrency: int | None = None
    rate: float | None = None          # requests per second (Poisson)
    max_concurrency: int | None = None  # rate mode: at most this many in flight
    warmup: int = 0                    # requests sent (and not measured) before the run
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError(f"set exactly one of concurrency and rate, got concurrency={self.concurrency} "
                             f"rate={self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def label(self) -> str:
        return f"concurrency={self.concurrency}" if self.concurrency else f"rate={self.rate:g}/s"


async def run_load(backend, requests: list[BenchRequest], load: LoadConfig,
                   progress=None) -> tuple[list[Timing], float]:
    """Send ``requests`` under ``load``; returns (timings in request order, measured seconds).
    ``progress``: an object with ``update(n)`` (e.g. a tqdm bar), called once per request done."""
    if load.warmup:
        width = load.concurrency or load.max_concurrency or 1
        warm = requests[:load.warmup] if load.warmup <= len(requests) else requests * (
            load.warmup // len(requests) + 1)
        await _closed_loop(backend, warm[:load.warmup], width, None)
    t0 = time.perf_counter()
    if load.concurrency:
        timings = await _closed_loop(backend, requests, load.concurrency, progress)
    else:
        timings = await _poisson(backend, requests, load, progress)
    return timings, time.perf_counter() - t0


async def _closed_loop(backend, requests, width: int, progress) -> list[Timing]:
    out: list[Timing | None] = [None] * len(requests)
    queue = iter(range(len(requests)))

    async def client() -> None:
        for i in queue:  # one shared iterator: each index is taken by exactly one client
            out[i] = await backend.send(requests[i])
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(client() for _ in range(min(width, len(requests)))))
    return out


async def poisson_starts(run, n: int, load: LoadConfig) -> None:
    """Start ``run(i)`` for i in 0..n-1 at Poisson arrivals of ``load.rate`` per second (seeded
    by ``load.seed``), at most ``load.max_concurrency`` running (0 = no cap); returns when all
    ended. Used for requests here and for conversations (``services.loadgen.conversations``)."""
    rng = random.Random(load.seed)
    gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None

    async def one(i: int) -> None:
        if gate is None:
            return await run(i)
        async with gate:
            await run(i)

    tasks, start, at = [], time.perf_counter(), 0.0
    for i in range(n):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        at += rng.expovariate(load.rate)
    await asyncio.gather(*tasks)


async def _poisson(backend, requests, load: LoadConfig, progress) -> list[Timing]:
    out: list[Timing | None] = [None] * len(requests)

    async def one(i: int) -> None:
        out[i] = await backend.send(requests[i])
        if progress is not None:
            progress.update(1)

    await poisson_starts(one, len(requests), load)
    return out
