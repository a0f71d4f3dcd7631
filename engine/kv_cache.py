"""Paged KV cache: the cache tensor and the block allocator that hands out its blocks.

The decode service allocates blocks at reserve time (prompt + max_tokens, all up front, so a
running sequence never runs out) and frees them when the sequence ends or is aborted. The
prefill service allocates blocks for a prompt, runs it, packs the KV out and frees them.
Accounting is exact: ``free_blocks + sum(allocated) == total`` at all times, and double
frees or frees of unknown owners raise instead of corrupting the count.
"""
from __future__ import annotations

import threading

import torch

from common.model import CacheConfig, ModelConfig


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for an allocation (admission control turns this into RESOURCE_EXHAUSTED)."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def allocate_kv_cache(model: ModelConfig, cache: CacheConfig, num_kv_heads: int | None = None,
                      num_layers: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """The cache tensor ``kv[layer, 0=K|1=V, block, slot, kv_head, head_dim]`` of one rank.

    ``num_kv_heads`` / ``num_layers`` default to the whole model (a TP or PP rank passes its share).
    """
    heads = model.num_kv_heads if num_kv_heads is None else num_kv_heads
    layers = model.num_layers if num_layers is None else num_layers
    shape = (layers, 2, cache.blocks_for(model), cache.block_size, heads, model.head_dim)
    return torch.zeros(shape, dtype=model.torch_dtype, device=device)


class BlockAllocator:
    """Thread-safe free list of block ids, with ownership so frees are checked.

    Block 0 is never handed out when ``reserve_null_block`` is set (padding in block tables
    may then point at it harmlessly).
    """

    def __init__(self, num_blocks: int, block_size: int, reserve_null_block: bool = True) -> None:
        if num_blocks < 1 + int(reserve_null_block):
            raise ValueError(f"num_blocks={num_blocks} is too small for a KV cache")
        self.block_size = block_size
        first = 1 if reserve_null_block else 0
        self.total = num_blocks - first
        self._free = list(range(num_blocks - 1, first - 1, -1))
        self._owned: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    @property
    def free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) <= self.free_blocks

    def allocate(self, owner: str, num_tokens: int) -> list[int]:
        """Blocks for ``num_tokens`` tokens, recorded under ``owner``. Raises OutOfBlocks."""
        need = blocks_needed(num_tokens, self.block_size)
        with self._lock:
            if owner in self._owned:
                raise ValueError(f"owner {owner!r} already holds blocks")
            if need > len(self._free):
                raise OutOfBlocks(f"need {need} KV blocks for {num_tokens} tokens, "
                                  f"{len(self._free)} of {self.total} free")
            blocks = [self._free.pop() for _ in range(need)]
            self._owned[owner] = blocks
            return blocks

    def free(self, owner: str) -> bool:
        """Return ``owner``'s blocks to the free list; False when it holds none (idempotent)."""
        with self._lock:
            blocks = self._owned.pop(owner, None)
            if blocks is None:
                return False
            self._free.extend(reversed(blocks))
            return True

    def blocks_of(self, owner: str) -> list[int]:
        with self._lock:
            if owner not in self._owned:
                raise KeyError(f"owner {owner!r} holds no blocks")
            return list(self._owned[owner])

    def owners(self) -> list[str]:
        with self._lock:
            return list(self._owned)
