"""kernels.kv_copy: pack / unpack round trips over the paged KV cache layout.

Pack and unpack copy values (no arithmetic), so every comparison here is bit for bit on any CPU."""
import pytest
import torch

from kernels.kv_copy import kv_pack, kv_piece_nbytes, kv_piece_shape, kv_unpack

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 12, 4, 4, 8


def make_cache(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, BLOCKS, BS, HEADS, DIM, generator=g).to(dtype)


def reference_pack(kv, table, t0, t1, l0, l1, h0, h1):
    """Slow per-token gather, the definition kv_pack must match."""
    rows = [kv[l0:l1, :, table[p // BS], p % BS, h0:h1] for p in range(t0, t1)]
    if not rows:
        return torch.empty(l1 - l0, 2, 0, h1 - h0, DIM, dtype=kv.dtype)
    return torch.stack(rows, dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_into_a_different_block_table(dtype):
    src_cache, dst_cache = make_cache(dtype), torch.zeros(LAYERS, 2, BLOCKS, BS, HEADS, DIM, dtype=dtype)
    src_table, dst_table = [7, 2, 9], torch.tensor([1, 11, 4])
    tokens = 10                                    # partial last block (10 = 4 + 4 + 2)
    piece = kv_pack(src_cache, src_table, 0, tokens, 0, LAYERS, 0, HEADS)
    assert piece.shape == kv_piece_shape(0, tokens, 0, LAYERS, 0, HEADS, DIM)
    assert piece.is_contiguous() and piece.dtype == dtype
    assert torch.equal(piece, reference_pack(src_cache, src_table, 0, tokens, 0, LAYERS, 0, HEADS))
    kv_unpack(piece, dst_cache, dst_table, 0, 0, 0)
    assert torch.equal(kv_pack(dst_cache, dst_table, 0, tokens, 0, LAYERS, 0, HEADS), piece)
    # slots past the last token of the partial block and unrelated blocks stay untouched
    assert dst_cache[:, :, 4, 2:].abs().sum() == 0
    assert dst_cache[:, :, [0, 2, 3, 5, 6, 7, 8, 9, 10]].abs().sum() == 0


@pytest.mark.parametrize("t0,t1,l0,l1,h0,h1", [(3, 9, 1, 3, 1, 3), (5, 6, 0, 1, 3, 4),
                                               (0, 12, 2, 3, 0, 4), (4, 4, 0, 3, 0, 4)])
def test_subranges_land_in_place(t0, t1, l0, l1, h0, h1):
    src_cache, dst_cache = make_cache(seed=1), make_cache(seed=2)
    before = dst_cache.clone()
    src_table, dst_table = [3, 0, 5], [10, 6, 8]
    piece = kv_pack(src_cache, src_table, t0, t1, l0, l1, h0, h1)
    assert torch.equal(piece, reference_pack(src_cache, src_table, t0, t1, l0, l1, h0, h1))
    assert piece.numel() * piece.element_size() == \
        kv_piece_nbytes(t0, t1, l0, l1, h0, h1, DIM, torch.float32)
    kv_unpack(piece, dst_cache, dst_table, t0, l0, h0)
    assert torch.equal(kv_pack(dst_cache, dst_table, t0, t1, l0, l1, h0, h1), piece)
    changed = (dst_cache != before).any(dim=-1)          # [L, 2, block, slot, head]
    expected = torch.zeros_like(changed)
    for p in range(t0, t1):
        expected[l0:l1, :, dst_table[p // BS], p % BS, h0:h1] = True
    assert not (changed & ~expected).any()


def test_out_buffer_is_filled_and_returned():
    cache = make_cache()
    out = torch.empty(kv_piece_shape(1, 7, 0, 2, 1, 3, DIM))
    result = kv_pack(cache, [4, 5], 1, 7, 0, 2, 1, 3, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, reference_pack(cache, [4, 5], 1, 7, 0, 2, 1, 3))


@pytest.mark.parametrize("call", [
    lambda c: kv_pack(c, [0, 1], 0, 9, 0, LAYERS, 0, HEADS),           # tokens past the table
    lambda c: kv_pack(c, [0, 99], 0, 8, 0, LAYERS, 0, HEADS),          # block id out of range
    lambda c: kv_pack(c, [0], 0, 4, 0, LAYERS + 1, 0, HEADS),          # layer range
    lambda c: kv_pack(c, [0], 0, 4, 0, LAYERS, 2, 1),                  # empty-negative heads
    lambda c: kv_pack(c, [0], 0, 4, 0, LAYERS, 0, HEADS, out=torch.empty(1)),
    lambda c: kv_unpack(torch.zeros(1, 2, 4, HEADS, DIM, dtype=torch.bfloat16), c, [0], 0, 0, 0),
    lambda c: kv_pack(c[:, :, :, :, :2], [0], 0, 4, 0, LAYERS, 0, 2),  # non-contiguous cache
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call(make_cache())
