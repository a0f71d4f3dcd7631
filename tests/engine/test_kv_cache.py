"""The KV cache tensor's shape and block arithmetic (engine/kv_cache.py); block ownership is
tested in test_block_manager.py."""
from __future__ import annotations

import pytest
import torch

from common.model import CacheConfig, ModelConfig
from engine.kv_cache import allocate_kv_cache, blocks_needed

pytestmark = pytest.mark.unit


def _model(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position=128, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_kv_cache_shape_and_dtype():
    model = _model()
    kv = allocate_kv_cache(model, CacheConfig(block_size=8, num_blocks=5))
    assert kv.shape == (3, 2, 5, 8, 2, 8)
    assert kv.dtype == torch.float32
    assert not kv.any()
    shard = allocate_kv_cache(model, CacheConfig(block_size=4, num_blocks=7), num_kv_heads=1, num_layers=2)
    assert shard.shape == (2, 2, 7, 4, 1, 8)
    half = allocate_kv_cache(_model(dtype="bfloat16"), CacheConfig(block_size=4, num_blocks=2))
    assert half.dtype == torch.bfloat16


def test_allocate_kv_cache_from_memory_budget():
    model = _model()
    per_block = model.kv_bytes_per_token() * 4  # 2 * 3 layers * 2 heads * 8 dims * 4 bytes * 4 slots
    kv = allocate_kv_cache(model, CacheConfig(block_size=4, memory_bytes=per_block * 3 + 1))
    assert kv.shape[2] == 3
    assert kv.numel() * kv.element_size() == per_block * 3
