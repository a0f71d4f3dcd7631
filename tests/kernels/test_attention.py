"""The batched CPU paged decode attention (``kernels.attention.paged_decode_attention``, what
``kernels`` dispatches CPU tensors to) against the per-sequence oracle
``paged_decode_attention_reference``: ragged and block-unaligned lengths, GQA groups 1/3/8,
scattered block ids, garbage past each context, fp32 and bf16; its length groups; and that it
makes one SDPA call for a batch of close lengths instead of one per sequence.

The batched and the per-sequence paths are two SDPA calls of different shapes: the vendor
kernel may block their reductions differently (it does on an AMD EPYC, not on an Intel Xeon
with AMX), so they agree within ``tests.tolerances``, never bit for bit (issue 19)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import attention as attn
from tests.tolerances import assert_close, attention_length

pytestmark = pytest.mark.unit

BLOCK = 4


HEAD_DIM = 16


def paged_batch(lengths, h, kvh, d=HEAD_DIM, dtype=torch.float32, width=None, seed=0):
    """``(q, kv_layer, block_tables, context_lens)`` with each sequence's blocks scattered over
    the cache, NaN in every slot no context covers (a stale or never-written slot), and table
    entries past a context that are not block ids (-1, out of range)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lengths]
    width = width or max(need) + 1
    num_blocks = sum(need) + 3
    kv = torch.full((2, num_blocks, BLOCK, kvh, d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = torch.full((len(lengths), width), -1, dtype=torch.int32), 0
    for b, (n, nb) in enumerate(zip(lengths, need)):
        tables[b, :nb] = torch.tensor(perm[at: at + nb])
        tables[b, nb + 1:] = num_blocks + 7
        ctx = torch.randn(2, nb * BLOCK, kvh, d, generator=g)[:, :n]
        slots = tables[b, :nb].long()[:, None] * BLOCK + torch.arange(BLOCK)
        kv.view(2, -1, kvh, d)[:, slots.flatten()[:n]] = ctx.to(dtype)
        at += nb
    q = torch.randn(len(lengths), h, d, generator=g).to(dtype)
    return q, kv, tables, torch.tensor(lengths, dtype=torch.int32)


def check(lengths, h, kvh, dtype=torch.float32, **kw):
    q, kv, tables, lens = paged_batch(lengths, h, kvh, dtype=dtype, **kw)
    want = attn.paged_decode_attention_reference(q, kv, tables, lens, 0.25)
    got = kernels.paged_decode_attention(q, kv, tables, lens, 0.25)
    assert not want.isnan().any(), "the oracle read a slot past a context"
    # SDPA accumulates in fp32 whatever the inputs; the results are rounded to ``dtype``
    assert_close(got, want, k=attention_length(HEAD_DIM, max(lengths)), accumulate=torch.float32)
    return got, want


RAGGED = [1, 3, BLOCK, BLOCK + 1, 2 * BLOCK, 37, 130]   # one token, unaligned, exactly a block, ...


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh", [(4, 4), (9, 3), (8, 1)])
def test_ragged_batch_matches_reference(h, kvh, dtype):
    check(RAGGED, h, kvh, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 2, 200])
def test_single_sequence_matches_the_reference(n, dtype):
    """No padding, no mask: one SDPA call of the oracle's shape (within rounding: the batched
    path gathers K/V by block rows, the oracle by a block slice, so the inputs' strides and
    the kernel's blocking may differ)."""
    check([n], 9, 3, dtype)


def test_equal_lengths_match_the_reference():
    """Equal lengths: the no-mask path, the whole batch in one SDPA call (issue 19: on an AMD
    EPYC that call rounds differently from six calls of one sequence)."""
    check([21] * 6, 9, 3)


def test_one_long_context_among_short_ones_is_split_and_matches():
    lengths = [3, 5, 700, 2, 6, 4, 1, 7]
    assert len(attn.decode_groups(lengths, token_bytes=1)) == 2
    check(lengths, 9, 3)


def test_one_sdpa_call_for_close_lengths(monkeypatch):
    """The whole batch in one call (no per-sequence loop); a spread batch in a few."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def counting(*args, **kw):
        calls.append(args[0].shape[0])
        return sdpa(*args, **kw)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", counting)
    q, kv, tables, lens = paged_batch([30 + i % 9 for i in range(16)], 9, 3)
    kernels.paged_decode_attention(q, kv, tables, lens, 0.25)
    assert calls == [16]
    calls.clear()
    q, kv, tables, lens = paged_batch([1000] + [2] * 15, 9, 3)
    kernels.paged_decode_attention(q, kv, tables, lens, 0.25)
    assert sorted(calls) == [1, 15]


def test_decode_groups_bound_padding_and_memory():
    lengths = [1, 900, 40, 33, 2048, 64, 64, 7, 512, 513]
    groups = attn.decode_groups(lengths, token_bytes=4)
    assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
    for g in groups:
        padded, real = len(g) * lengths[g[0]], sum(lengths[b] for b in g)
        assert lengths[g[0]] == max(lengths[b] for b in g)
        assert padded <= attn.DECODE_PAD_RATIO * real + attn.DECODE_PAD_TOKENS
    # a token so large that two never fit the gather budget: one sequence a group
    huge = attn.DECODE_GATHER_BYTES // 64 + 1
    assert [len(g) for g in attn.decode_groups([64] * 5, token_bytes=huge)] == [1] * 5
    assert attn.decode_groups([], token_bytes=4) == []


def test_empty_batch_and_validation_errors():
    q, kv, tables, lens = paged_batch([5, 9], 4, 2)
    assert kernels.paged_decode_attention(q[:0], kv, tables[:0], lens[:0], 0.25).shape == (0, 4, 16)
    for bad in ([0, 9], [5, 4 * tables.shape[1] + 1]):
        lens_bad = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(ValueError, match="is outside 1..") as got:
            kernels.paged_decode_attention(q, kv, tables, lens_bad, 0.25)
        with pytest.raises(ValueError) as want:
            attn.paged_decode_attention_reference(q, kv, tables, lens_bad, 0.25)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="disagree"):
        kernels.paged_decode_attention(q[:1], kv, tables, lens, 0.25)
