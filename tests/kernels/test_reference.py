"""Reference kernels (kernels.ops, kernels.attention via the kernels dispatch) vs naive maths
and vs Hugging Face's own Llama functions.

Against the fp64 naive maths and against ``transformers``' rotary (other ops, another table
shape): within ``tests.tolerances`` for the reduction length. RMSNorm against
``transformers``' ``LlamaRMSNorm`` stays bit for bit: the same PyTorch ops, in the same order,
on the same tensors, i.e. the same kernels computing the same thing twice."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import attention as attn_ref
from kernels import ops
from tests.tolerances import assert_close, attention_length

pytestmark = pytest.mark.unit


def naive_attention(q, k, v, scale, causal_offset=None):
    """fp64 softmax attention for one sequence: q [Lq,H,D], k/v [Lk,KVH,D] -> ([Lq,H,D], lse [Lq,H])."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal_offset is not None:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + causal_offset
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return out, lse.transpose(0, 1)


def flat(lengths, h, kvh, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, kvh, kvh))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("h,kvh", [(4, 4), (6, 2), (8, 1)])
def test_prefill_attention_matches_naive(h, kvh):
    lengths = [1, 5, 17, 33]
    q, k, v, cu = flat(lengths, h, kvh, 16)
    out = kernels.prefill_attention(q, k, v, cu, 0.25)
    out_lse, lse = kernels.prefill_attention_lse(q, k, v, cu, 0.25)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want, want_lse = naive_attention(q[a:b], k[a:b], v[a:b], 0.25, causal_offset=0)
        k_len = attention_length(16, b - a)
        assert_close(out[a:b], want, k=k_len)
        assert_close(out_lse[a:b], want, k=k_len)
        assert_close(lse[a:b], want_lse, k=k_len)


def test_lse_partials_merge_to_full_attention():
    """Split each sequence's keys in two chunks; merging the partials gives full attention."""
    q, k, v, cu = flat([7, 12], 6, 2, 8, seed=1)
    outs = []
    for part in (0, 1):
        sel, cu_k = [], [0]
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            mid = (a + b) // 2
            idx = list(range(a, mid)) if part == 0 else list(range(mid, b))
            sel += idx
            cu_k.append(cu_k[-1] + len(idx))
        outs.append(kernels.prefill_attention_lse(q, k[sel], v[sel], cu, 0.3, causal=False,
                                                  cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32)))
    out, lse = kernels.merge_attention(*outs[0], *outs[1])
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want, want_lse = naive_attention(q[a:b], k[a:b], v[a:b], 0.3)
        assert_close(out[a:b], want, k=attention_length(8, b - a) + 2)     # + the merge's sum of two
        assert_close(lse[a:b], want_lse, k=attention_length(8, b - a) + 2)


def test_lse_causal_bottom_right_alignment():
    """2 queries that are the last of 5 keys: query r sees keys 0..r+3."""
    q, k, v, _ = flat([5], 4, 2, 8, seed=2)
    out, lse = kernels.prefill_attention_lse(q[3:], k, v, torch.tensor([0, 2], dtype=torch.int32), 0.5,
                                             cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32))
    want, want_lse = naive_attention(q[3:], k, v, 0.5, causal_offset=3)
    assert_close(out, want, k=attention_length(8, 5))
    assert_close(lse, want_lse, k=attention_length(8, 5))


def test_store_kv_writes_slots_and_skips_negative():
    kv_layer = torch.zeros(2, 4, 4, 2, 3)           # 4 blocks of 4 slots
    k, v = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    kernels.store_kv(k, v, kv_layer, torch.tensor([13, 2, -1]))
    assert torch.equal(kv_layer[0, 3, 1], k[0])     # a store moves the values: bit for bit
    assert torch.equal(kv_layer[1, 0, 2], v[1])
    assert int((kv_layer != 0).flatten(2).any(-1).sum()) == 4   # 2 tokens x (K, V)
    with pytest.raises(ValueError, match="store_kv shapes"):
        kernels.store_kv(k, v, kv_layer, torch.tensor([0, 1]))


@pytest.mark.parametrize("decode", [kernels.paged_decode_attention,
                                    attn_ref.paged_decode_attention_reference],
                         ids=["batched", "per-sequence"])
@pytest.mark.parametrize("h,kvh", [(4, 4), (9, 3), (8, 1)])
def test_paged_decode_attention_matches_naive(h, kvh, decode):
    block_size, d, lens = 4, 16, [1, 4, 7, 13]
    g = torch.Generator().manual_seed(3)
    kv_layer = torch.randn(2, 16, block_size, kvh, d, generator=g)
    perm = torch.randperm(16, generator=g).tolist()     # scattered, non-contiguous blocks
    tables, at = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[at: at + nb] + [0] * (4 - nb))
        at += nb
    q = torch.randn(len(lens), h, d, generator=g)
    out = decode(q, kv_layer, torch.tensor(tables, dtype=torch.int32),
                 torch.tensor(lens, dtype=torch.int32), 0.25)
    for b, n in enumerate(lens):
        ctx = kv_layer[:, tables[b]].flatten(1, 2)[:, :n]
        want, _ = naive_attention(q[b: b + 1], ctx[0], ctx[1], 0.25)
        assert_close(out[b: b + 1], want, k=attention_length(d, n))


def test_rms_norm_matches_hf_and_fuses_residual():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, res = torch.randn(5, 64), torch.randn(5, 64)
    hf = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64))
        # bit for bit: kernels.ops.rms_norm runs LlamaRMSNorm's ops in its order on the same
        # tensors (the same kernels twice); the residual add is the same single add
        assert torch.equal(kernels.rms_norm(x, hf.weight, 1e-5), hf(x))
        out, new_res = kernels.rms_norm(x, hf.weight, 1e-5, residual=res)
        assert torch.equal(new_res, x + res)
        assert torch.equal(out, hf(x + res))


def test_rotary_matches_hf():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    head_dim, theta = 16, 500000.0
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=theta, max_position_embeddings=256)
    positions = torch.tensor([0, 1, 2, 37, 100, 255])
    q, k = torch.randn(6, 4, head_dim), torch.randn(6, 2, head_dim)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = kernels.build_rope_cache(head_dim, 256, theta)
    got_q, got_k = kernels.rotary_embedding(q, k, positions, cache)
    # two products summed (k=2); not bit for bit: the cos/sin tables are computed in other
    # shapes here and in transformers, and a vectorized cos and the scalar one at a loop's
    # tail may differ in the last bit
    assert_close(got_q, want_q[0].transpose(0, 1), k=2)
    assert_close(got_k, want_k[0].transpose(0, 1), k=2)


def test_silu_and_mul():
    x = torch.randn(3, 10)
    # bit for bit: kernels.ops.silu_and_mul is these two ops on the same halves
    assert torch.equal(kernels.silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
    with pytest.raises(ValueError):
        kernels.silu_and_mul(torch.randn(2, 3))


def test_dispatch_picks_reference_on_cpu():
    x = torch.randn(2, 4)
    assert kernels._pick("rms_norm", x) is ops.rms_norm
    assert kernels._pick("paged_decode_attention", x) is attn_ref.paged_decode_attention
