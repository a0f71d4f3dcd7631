"""Routing policies: which decode and prefill instances serve a request (DESIGN §6).

A policy orders candidates; the router tries them in that order (a decode instance may still
refuse a reservation when its room went to another router). Policies are pure functions
of the worker views, so they are tested without any server.
"""
from __future__ import annotations

import abc

from router.workers import WorkerHandle


class RoutingPolicy(abc.ABC):
    def can_hold(self, worker: WorkerHandle, tokens_needed: int) -> bool:
        """Whether decode instance ``worker`` could ever hold ``tokens_needed`` tokens of KV (its
        whole cache, empty): a request no instance can hold is refused, not queued."""
        cap = worker.record.capacity
        return cap.get("total_blocks", 0) * cap.get("block_size", 16) >= tokens_needed

    @abc.abstractmethod
    def rank_decode(self, workers: list[WorkerHandle], tokens_needed: int) -> list[WorkerHandle]:
        """Decode instances with room for ``tokens_needed`` tokens of KV now, best first."""

    @abc.abstractmethod
    def rank_prefill(self, workers: list[WorkerHandle], num_tokens: int) -> list[WorkerHandle]:
        """Prefill instances, best first."""


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // max(block_size, 1))


class LeastLoadPolicy(RoutingPolicy):
    """Decode: enough free KV blocks, then fewest sequences. Prefill: fewest queued prompt tokens."""

    def rank_decode(self, workers, tokens_needed):
        def free(h: WorkerHandle) -> int:
            bs = h.record.capacity.get("block_size", 16)
            return h.record.load.get("free_blocks", 0) - _blocks(h.inflight_tokens, bs)

        fits = [h for h in workers
                if free(h) >= _blocks(tokens_needed, h.record.capacity.get("block_size", 16))]
        return sorted(fits, key=lambda h: (h.record.load.get("running", 0) + h.record.load.get("waiting", 0)
                                           + h.inflight, -free(h), h.record.worker_id))

    def rank_prefill(self, workers, num_tokens):
        return sorted(workers, key=lambda h: (h.record.load.get("queued_tokens", 0) + h.inflight_tokens,
                                              h.inflight, h.record.worker_id))


POLICIES = {"least-load": LeastLoadPolicy}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}") from None
