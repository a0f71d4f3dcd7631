"""BlockAllocator accounting and the KV cache tensor's shape (engine/kv_cache.py)."""
from __future__ import annotations

import random

import pytest
import torch

from common.model import CacheConfig, ModelConfig
from engine.kv_cache import BlockAllocator, OutOfBlocks, allocate_kv_cache, blocks_needed

pytestmark = pytest.mark.unit


def _model(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10000.0,
                rms_norm_eps=1e-5, max_position=128, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def _check_invariants(alloc: BlockAllocator, owned: dict[str, list[int]], num_blocks: int, reserved: bool):
    held = [b for blocks in owned.values() for b in blocks]
    assert alloc.free_blocks + len(held) == alloc.total == num_blocks - int(reserved)
    assert len(set(held)) == len(held), "a block was handed to two owners"
    if reserved:
        assert 0 not in held
    assert all(0 <= b < num_blocks for b in held)
    assert sorted(alloc.owners()) == sorted(owned)
    for owner, blocks in owned.items():
        assert alloc.blocks_of(owner) == blocks


@pytest.mark.parametrize("reserved", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_random_allocate_free_keeps_exact_accounting(seed, reserved):
    rng = random.Random(seed)
    num_blocks, block_size = 40, 4
    alloc = BlockAllocator(num_blocks, block_size, reserve_null_block=reserved)
    owned: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(400):
        if owned and rng.random() < 0.45:
            owner = rng.choice(sorted(owned))
            assert alloc.free(owner) is True
            del owned[owner]
        else:
            tokens = rng.randint(1, 40)
            owner = f"r{next_id}"
            next_id += 1
            free_before = alloc.free_blocks
            if blocks_needed(tokens, block_size) <= free_before:
                assert alloc.can_allocate(tokens)
                blocks = alloc.allocate(owner, tokens)
                assert len(blocks) == blocks_needed(tokens, block_size)
                owned[owner] = blocks
            else:
                assert not alloc.can_allocate(tokens)
                with pytest.raises(OutOfBlocks):
                    alloc.allocate(owner, tokens)
                assert alloc.free_blocks == free_before
                assert owner not in alloc.owners()
        _check_invariants(alloc, owned, num_blocks, reserved)
    for owner in list(owned):
        alloc.free(owner)
        del owned[owner]
    _check_invariants(alloc, owned, num_blocks, reserved)
    assert alloc.free_blocks == alloc.total


def test_out_of_blocks_leaves_state_unchanged():
    alloc = BlockAllocator(5, 4)  # 4 usable blocks
    a = alloc.allocate("a", 9)    # 3 blocks
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks for 5 tokens, 1 of 4 free"):
        alloc.allocate("b", 5)
    assert alloc.free_blocks == 1
    assert alloc.owners() == ["a"]
    assert alloc.blocks_of("a") == a
    with pytest.raises(KeyError):
        alloc.blocks_of("b")
    # the failed owner name is still usable, and the one remaining block is still there
    assert alloc.allocate("b", 4) != []
    assert alloc.free_blocks == 0


def test_double_free_and_unknown_free_return_false():
    alloc = BlockAllocator(8, 16)
    alloc.allocate("x", 17)
    assert alloc.free("x") is True
    assert alloc.free("x") is False
    assert alloc.free("never") is False
    assert alloc.free_blocks == 7


def test_duplicate_owner_raises_and_changes_nothing():
    alloc = BlockAllocator(8, 16)
    first = alloc.allocate("x", 10)
    with pytest.raises(ValueError, match="'x' already holds blocks"):
        alloc.allocate("x", 10)
    assert alloc.blocks_of("x") == first
    assert alloc.free_blocks == 6


def test_block_zero_reserved_and_all_others_handed_out():
    alloc = BlockAllocator(6, 2)
    blocks = alloc.allocate("all", 10)
    assert sorted(blocks) == [1, 2, 3, 4, 5]
    assert alloc.free_blocks == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate("more", 1)

    plain = BlockAllocator(3, 2, reserve_null_block=False)
    assert sorted(plain.allocate("all", 6)) == [0, 1, 2]


def test_blocks_reused_after_free():
    alloc = BlockAllocator(4, 1)
    a = alloc.allocate("a", 3)
    alloc.free("a")
    assert sorted(alloc.allocate("b", 3)) == sorted(a)


def test_blocks_of_returns_a_copy():
    alloc = BlockAllocator(4, 1)
    alloc.allocate("a", 2)
    alloc.blocks_of("a").append(99)
    assert 99 not in alloc.blocks_of("a")


@pytest.mark.parametrize("num_blocks,reserved", [(0, False), (1, True)])
def test_too_few_blocks_rejected(num_blocks, reserved):
    with pytest.raises(ValueError, match=f"num_blocks={num_blocks}"):
        BlockAllocator(num_blocks, 4, reserve_null_block=reserved)


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
