"""Routing policies: which decode and prefill instances serve a request (DESIGN §6).

A policy orders candidates; the router tries them in that order (a decode instance may still
refuse a reservation when its room went to another router). Policies are pure functions
of the worker views and of ``cached`` (``{worker_id: prompt tokens the router's KV index says
that worker holds}``, ``router.kv_index``), so they are tested without any server.

- ``least-load``: decode by free KV blocks then fewest sequences; prefill by fewest queued
  prompt tokens. Blind to caches.
- ``kv-aware`` (the default): the cost of a worker is the work the request would cost there,
  in prompt tokens. Prefill: the prompt tokens it would compute (those its cache lacks) plus
  the prompt tokens queued ahead of it. Decode: the prompt tokens it would receive (its cache
  lacks) plus ``DECODE_SEQUENCE_TOKENS`` per sequence it already runs or expects, among the
  instances with room for the prompt's uncached blocks. Same idea as Dynamo's KV router
  (overlap blocks against load), with both terms in tokens so neither needs tuning per model.
"""
from __future__ import annotations

import abc

from router.workers import WorkerHandle


# What one more running sequence costs a decode instance, in prompt tokens received: a
# sequence adds a row to every decode step for its whole life, while a handoff of N tokens
# costs one transfer; 64 tokens keeps a warm instance preferred until it runs a few more
# sequences than a cold one (bench/kv_cache.py measures the trade on this machine).
DECODE_SEQUENCE_TOKENS = 64


class RoutingPolicy(abc.ABC):
    def can_hold(self, worker: WorkerHandle, tokens_needed: int) -> bool:
        """Whether decode instance ``worker`` could ever hold ``tokens_needed`` tokens of KV (its
        whole cache, empty): a request no instance can hold is refused, not queued."""
        cap = worker.record.capacity
        return cap.get("total_blocks", 0) * cap.get("block_size", 16) >= tokens_needed

    @abc.abstractmethod
    def rank_decode(self, workers: list[WorkerHandle], tokens_needed: int,
                    cached: dict[str, int] | None = None) -> list[WorkerHandle]:
        """Decode instances with room for ``tokens_needed`` tokens of KV now (less what each
        holds cached, ``cached`` by worker id), best first."""

    @abc.abstractmethod
    def rank_prefill(self, workers: list[WorkerHandle], num_tokens: int,
                     cached: dict[str, int] | None = None) -> list[WorkerHandle]:
        """Prefill instances, best first."""


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // max(block_size, 1))


def _free(h: WorkerHandle) -> int:
    """Blocks a decode instance has for a new reservation: free or evictable, less what
    reservations on their way there will take."""
    return h.record.load.get("free_blocks", 0) - _blocks(h.inflight_tokens, h.record.capacity.get("block_size", 16))


def _sequences(h: WorkerHandle) -> int:
    return h.record.load.get("running", 0) + h.record.load.get("waiting", 0) + h.inflight


def _room(workers, tokens_needed: int, cached: dict[str, int]) -> list[WorkerHandle]:
    """The instances with room for the blocks of ``tokens_needed`` they do not hold cached."""
    return [h for h in workers if _free(h) >= _blocks(tokens_needed - cached.get(h.record.worker_id, 0),
                                                      h.record.capacity.get("block_size", 16))]


class LeastLoadPolicy(RoutingPolicy):
    """Decode: enough free KV blocks, then fewest sequences. Prefill: fewest queued prompt tokens."""

    def rank_decode(self, workers, tokens_needed, cached=None):
        return sorted(_room(workers, tokens_needed, {}),
                      key=lambda h: (_sequences(h), -_free(h), h.record.worker_id))

    def rank_prefill(self, workers, num_tokens, cached=None):
        return sorted(workers, key=lambda h: (h.record.load.get("queued_tokens", 0) + h.inflight_tokens,
                                              h.inflight, h.record.worker_id))


class KvAwarePolicy(RoutingPolicy):
    """Cost in prompt tokens of the work the request makes there (see the module docstring)."""

    def rank_decode(self, workers, tokens_needed, cached=None):
        cached = cached or {}
        return sorted(_room(workers, tokens_needed, cached), key=lambda h: (
            tokens_needed - cached.get(h.record.worker_id, 0) + DECODE_SEQUENCE_TOKENS * _sequences(h),
            -_free(h), h.record.worker_id))

    def rank_prefill(self, workers, num_tokens, cached=None):
        cached = cached or {}
        return sorted(workers, key=lambda h: (
            num_tokens - cached.get(h.record.worker_id, 0) + h.record.load.get("queued_tokens", 0)
            + h.inflight_tokens, h.inflight, h.record.worker_id))


POLICIES = {"least-load": LeastLoadPolicy, "kv-aware": KvAwarePolicy}
DEFAULT_POLICY = "kv-aware"


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}") from None
