"""Prefill with context (``kernels.paged_prefill_attention``): the new tokens of a prompt whose
leading tokens are already in the paged cache, against ``prefill_attention`` over the whole
prompt (the rows of the new tokens). Several sequences of different lengths and cached
prefixes in one batch, GQA groups 1/3/8, block sizes 4 and 16, scattered block ids, NaN in
every slot no context covers, garbage table entries past each context, fp32 and bf16, nothing
cached (the causal mask then equals ``is_causal``), one new token.

The two paths are different SDPA calls (an explicit mask over gathered K/V against
``is_causal`` over the fresh K/V): they agree within ``tests.tolerances``, never bit for bit."""
from __future__ import annotations

import types

import pytest
import torch

import kernels
from kernels import attention as attn
from tests.tolerances import assert_close, attention_length

pytestmark = pytest.mark.unit

HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5
ROUNDINGS = {torch.float32: 0, torch.bfloat16: 2}   # bf16: either SDPA kernel may round the
                                                    # probabilities to bf16 before P V


def case(lengths, cached, h, kvh, block_size, dtype=torch.float32, seed=0):
    """``(args of paged_prefill_attention, want)``: each prompt's whole K/V stored in scattered
    blocks (NaN elsewhere), q of its new tokens, and ``prefill_attention``'s rows for them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), n, HEAD_DIM, generator=g).to(dtype) for n in (h, kvh, kvh))
    cu_full = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    full = attn.prefill_attention(q, k, v, cu_full, SCALE)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    kv = torch.full((2, num_blocks, block_size, kvh, HEAD_DIM), float("nan"), dtype=dtype)
    perm, at = torch.randperm(num_blocks, generator=g).tolist(), 0
    width = max(need) + 2
    tables = torch.full((len(lengths), width), -1, dtype=torch.int32)
    rows = []
    for i, (n, nb, c) in enumerate(zip(lengths, need, cached)):
        tables[i, :nb] = torch.tensor(perm[at: at + nb])
        tables[i, nb + 1:] = num_blocks + 7                      # not a block id
        at += nb
        slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                              for p in range(n)])
        a = int(cu_full[i])
        attn.store_kv(k[a: a + n], v[a: a + n], kv, slots)
        rows.extend(range(a + c, a + n))
    cu_new = torch.tensor([0] + [n - c for n, c in zip(lengths, cached)]).cumsum(0, dtype=torch.int32)
    args = (q[rows], kv, tables, torch.tensor(lengths, dtype=torch.int32), cu_new, SCALE)
    return args, full[rows]


def check(lengths, cached, h, kvh, block_size, dtype=torch.float32):
    args, want = case(lengths, cached, h, kvh, block_size, dtype)
    got = kernels.paged_prefill_attention(*args)
    assert not got.isnan().any(), "read a slot past a context"
    # SDPA accumulates in fp32 whatever the inputs; the results are rounded to ``dtype``
    assert_close(got, want, k=attention_length(HEAD_DIM, max(lengths)), accumulate=torch.float32,
                 roundings=ROUNDINGS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh", [(4, 4), (9, 3), (8, 1)])
def test_mixed_batch_block_size_4(h, kvh, dtype):
    # cached whole blocks: some, none, all but one token, a long prefix of a long prompt
    check([7, 13, 9, 40, 6], [4, 0, 8, 32, 4], h, kvh, 4, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh", [(4, 4), (9, 3), (8, 1)])
def test_mixed_batch_block_size_16(h, kvh, dtype):
    check([20, 33, 17, 5, 70], [16, 32, 16, 0, 48], h, kvh, 16, dtype)


@pytest.mark.parametrize("block_size", [4, 16])
def test_nothing_cached_equals_prefill(block_size):
    check([1, 5, 16, 23], [0, 0, 0, 0], 6, 2, block_size)


@pytest.mark.parametrize("block_size", [4, 16])
def test_one_new_token_after_a_long_prefix(block_size):
    check([4 * block_size + 1], [4 * block_size], 8, 2, block_size)


def test_sequence_with_no_new_tokens_is_skipped():
    """A sequence may contribute no row (a later chunked prefill): the others are unaffected."""
    args, want = case([8, 12], [8, 4], 4, 2, 4)   # first: 0 new tokens
    got = kernels.paged_prefill_attention(*args)
    assert got.shape == want.shape == (8, 4, HEAD_DIM)
    assert_close(got, want, k=attention_length(HEAD_DIM, 12), accumulate=torch.float32)


def test_cuda_tensors_use_the_reference():
    """No Triton twin: ``_pick`` gives the PyTorch version for a CUDA tensor too."""
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    assert kernels._pick("paged_prefill_attention", fake_cuda) is attn.paged_prefill_attention


def test_validation_errors_name_the_culprit():
    (q, kv, tables, lens, cu, scale), _ = case([8, 12], [4, 4], 4, 2, 4)
    with pytest.raises(ValueError, match="disagree"):
        attn.paged_prefill_attention(q, kv, tables[:1], lens, cu, scale)
    with pytest.raises(ValueError, match="disagree"):
        attn.paged_prefill_attention(q[:-1], kv, tables, lens, cu, scale)
    with pytest.raises(ValueError, match="sequence 0"):      # more new tokens than context
        attn.paged_prefill_attention(q, kv, tables, torch.tensor([3, 12], dtype=torch.int32), cu, scale)
    with pytest.raises(ValueError, match="sequence 1"):      # beyond the block table
        attn.paged_prefill_attention(q, kv, tables, torch.tensor([8, 99], dtype=torch.int32), cu, scale)
    with pytest.raises(ValueError, match="head_dim"):
        attn.paged_prefill_attention(q[..., :8], kv, tables, lens, cu, scale)
