"""Paged KV cache: the cache tensor of one rank, and block arithmetic.

Which blocks hold what is ``engine.block_manager.BlockManager``'s business (the one owner of
block ids); this module only shapes the tensor they index.
"""
from __future__ import annotations

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
