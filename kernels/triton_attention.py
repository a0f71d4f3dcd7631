"""Triton twins of ``kernels.attention``: paged KV store, varlen causal prefill attention (with
its log-sum-exp form for ring attention) and split-KV paged decode attention.

Callers: only ``kernels/__init__.py`` (for CUDA tensors) and the tests. Shapes, GQA mapping
(query head ``h`` reads kv head ``h // group``) and validation errors are the references'; see
``kernels/attention.py``. All softmax maths is online (FlashAttention): per query row a running
max ``m`` and sum ``l`` in base 2 (scores are pre-multiplied by ``scale * log2(e)``), rescaling
the fp32 accumulator when ``m`` grows; a row that saw no key ends with ``l = 0`` and is written
as out 0, lse -inf, exactly as the references do. Matmuls run on tensor cores in the input dtype
with fp32 accumulation (bf16/fp16) or in exact fp32 (fp32 inputs, no TF32), see
``kernels.triton_util.dot``.

Host syncs: the prefill kernels read the longest sequence from ``cu_seqlens`` and decode reads
``min/max(context_lens)`` (to validate like the reference and to size the KV splits), one small
device-to-host copy per call, as the references' ``tolist()`` calls do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import _check_gqa
from kernels.triton_util import dot, dot_in_fp32, pow2

_LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)   # lse back from base 2 to base e


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, n_heads, head_dim, page,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ckv, stride_cb, stride_cs, stride_ch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(tokens,)``: copy token ``t``'s K and V ``[KVH, D]`` to flat slot
    ``slot_mapping[t]`` = block ``slot // page``, offset ``slot % page``; negative slot: skip."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < tl.where(slot >= 0, n_heads, 0)) & (d < head_dim)
    dst = cache_ptr + (slot // page) * stride_cb + (slot % page) * stride_cs + h * stride_ch + d
    ty = cache_ptr.dtype.element_ty
    tl.store(dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask).to(ty), mask=mask)
    tl.store(dst + stride_ckv, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask).to(ty),
             mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Same contract as ``kernels.attention.store_kv`` (in place; slots must be in range)."""
    if k.shape != v.shape or k.shape[0] != slot_mapping.shape[0] or k.shape[1:] != kv_layer.shape[3:]:
        raise ValueError(f"store_kv shapes disagree: k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"slots {tuple(slot_mapping.shape)} kv_layer {tuple(kv_layer.shape)}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"kv_layer needs a unit head_dim stride, got strides {kv_layer.stride()}")
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, kv_layer, slot_mapping.contiguous(), heads, dim, kv_layer.shape[2],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        BLOCK_H=pow2(heads), BLOCK_D=pow2(dim))


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, qk_scale, head_dim,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_lt, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32: tl.constexpr):
    """Grid ``(cdiv(max Lq, BLOCK_M), sequences, H)``: ``BLOCK_M`` queries of one sequence and
    head against that sequence's keys ``cu_k[b]:cu_k[b+1]``, ``BLOCK_N`` keys per step. Causal:
    query ``r`` of ``Lq`` sees key ``c`` of ``Lk`` iff ``c <= r + Lk - Lq`` (so the key loop
    stops at the block's last visible key). Writes out ``[T, H, D]`` and lse ``[T, H]`` fp32."""
    mb, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(cu_q_ptr + b).to(tl.int64)
    lq = tl.load(cu_q_ptr + b + 1).to(tl.int64) - q0
    k0 = tl.load(cu_k_ptr + b).to(tl.int64)
    lk = tl.load(cu_k_ptr + b + 1).to(tl.int64) - k0
    if mb * BLOCK_M >= lq:
        return
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dm = d < head_dim
    q = tl.load(q_ptr + (q0 + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=(rows[:, None] < lq) & dm[None, :], other=0.0)
    kvh = h // GROUP
    k_base = k_ptr + k0 * stride_kt + kvh * stride_kh
    v_base = v_ptr + k0 * stride_vt + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = lk
    if CAUSAL:
        hi = tl.minimum(lk, (mb + 1) * BLOCK_M + lk - lq)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < lk
        kt = tl.load(k_base + cols[None, :] * stride_kt + d[:, None],
                     mask=cm[None, :] & dm[:, None], other=0.0)
        s = dot(q, kt.to(q.dtype), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), FP32) * qk_scale
        ok = cm[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + (lk - lq))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols[:, None] * stride_vt + d[None, :],
                     mask=cm[:, None] & dm[None, :], other=0.0).to(q.dtype)
        acc = dot(p.to(q.dtype), vt, acc * alpha[:, None], FP32)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    rm = rows < lq
    tl.store(o_ptr + (q0 + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + (q0 + rows) * stride_lt + h, lse, mask=rm)


def _prefill(q, k, v, cu_q, cu_k, scale, causal):
    """Launch :func:`_prefill_kernel`; returns ``(out, lse)`` (zeros / -inf where no key)."""
    _check_gqa(q, k)
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens {tuple(cu_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_k.shape)} must list the same number of sequences")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    tokens, heads, dim = q.shape
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((tokens, heads), float("-inf"), dtype=torch.float32, device=q.device)
    seqs = cu_q.numel() - 1
    if seqs <= 0 or tokens == 0:
        return out, lse
    longest = int((cu_q[1:] - cu_q[:-1]).max())
    if longest <= 0:
        return out, lse
    block_m = 16 if longest <= 16 else 32 if q.dtype == torch.float32 else 64   # fp32: less smem
    block_n = 32
    _prefill_kernel[(triton.cdiv(longest, block_m), seqs, heads)](
        q, k, v, out, lse, cu_q.contiguous(), cu_k.contiguous(), float(scale) * _LOG2E, dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), GROUP=heads // k.shape[1], CAUSAL=bool(causal),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(dim, 16), FP32=dot_in_fp32(q, k),
        num_warps=8 if block_m == 64 else 4)     # 64x32 tiles, d=128: no spills with 8 warps
    return out, lse


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as ``kernels.attention.prefill_attention``: causal within each sequence."""
    return _prefill(q, k, v, cu_seqlens, cu_seqlens, scale, True)[0]


def prefill_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, scale: float, causal: bool = True,
                          cu_seqlens_k: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.attention.prefill_attention_lse``: ``(out, lse fp32)``."""
    return _prefill(q, k, v, cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k,
                    scale, causal)


@triton.jit
def _decode_split_kernel(q_ptr, kv_ptr, bt_ptr, ctx_ptr, po_ptr, plse_ptr, qk_scale, head_dim,
                         page, tokens_per_split, stride_qb, stride_qh, stride_ckv, stride_cb,
                         stride_cs, stride_ch, stride_bt, stride_pb, stride_ph, stride_ps,
                         stride_lb, stride_lh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr):
    """Grid ``(B, KVH, splits)``: the ``GROUP`` query heads of kv head ``kvh`` of sequence ``b``
    (padded to ``BLOCK_G`` rows of one tensor-core tile) against context tokens
    ``[s * tokens_per_split, min((s+1) * tokens_per_split, context_lens[b]))``, ``BLOCK_N`` at
    a time: token ``p`` lives at block ``block_tables[b, p // page]``, slot ``p % page``.
    Writes the split's normalised partial output ``[B, H, S, D]`` and base-2 lse ``[B, H, S]``
    (-inf for a split past the context)."""
    b, kvh, sp = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    n_ctx = tl.load(ctx_ptr + b).to(tl.int64)
    start = sp * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_ctx)
    g = tl.arange(0, BLOCK_G)
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < GROUP, d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tm = toks < end
        blk = tl.load(bt_ptr + b * stride_bt + toks // page, mask=tm, other=0).to(tl.int64)
        base = kv_ptr + blk * stride_cb + (toks % page) * stride_cs + kvh * stride_ch
        kt = tl.load(base[None, :] + d[:, None], mask=tm[None, :] & dm[:, None], other=0.0)
        s = dot(q, kt.to(q.dtype), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), FP32) * qk_scale
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(base[:, None] + stride_ckv + d[None, :], mask=tm[:, None] & dm[None, :],
                     other=0.0).to(q.dtype)
        acc = dot(p.to(q.dtype), vt, acc * alpha[:, None], FP32)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(po_ptr + b * stride_pb + heads[:, None] * stride_ph + sp * stride_ps + d[None, :],
             out, mask=gm[:, None] & dm[None, :])
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(plse_ptr + b * stride_lb + heads * stride_lh + sp, lse, mask=gm)


@triton.jit
def _decode_merge_kernel(po_ptr, plse_ptr, o_ptr, n_splits, head_dim, stride_pb, stride_ph,
                         stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(B, H)``: ``out = sum_s w_s o_s`` with ``w_s = 2^(lse_s - max) / sum 2^(lse -
    max)`` over the splits (a split with lse -inf weighs 0; split 0 always saw a token)."""
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < n_splits
    lse = tl.load(plse_ptr + b * stride_lb + h * stride_lh + s, mask=sm, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(po_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=sm[:, None] & (d[None, :] < head_dim), other=0.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, tl.sum(o * w[:, None], 0).to(
        o_ptr.dtype.element_ty), mask=d < head_dim)


def _num_splits(q: torch.Tensor, kv_heads: int, longest: int, block_n: int) -> int:
    """KV splits per (sequence, kv head): enough programs for about two waves over the GPU's
    SMs, but at least 256 context tokens (and one ``block_n`` step) per split."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    want = triton.cdiv(2 * sms, q.shape[0] * kv_heads)
    return max(1, min(want, triton.cdiv(longest, max(256, block_n)), 64))


def paged_decode_attention_splits(q: torch.Tensor, kv_layer: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, num_splits: int | None = None,
                                  max_context_len: int | None = None) -> torch.Tensor:
    """:func:`paged_decode_attention` with the number of KV splits chosen by the caller (tests
    and the bench force several); ``None`` picks it with :func:`_num_splits`. With
    ``max_context_len`` the lengths are not read back (no host sync: CUDA-graph capturable),
    and not checked: the caller vouches for ``1 <= context_lens <= max_context_len``."""
    if q.shape[0] != block_tables.shape[0] or q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"batch of q {tuple(q.shape)}, block_tables {tuple(block_tables.shape)} "
                         f"and context_lens {tuple(context_lens.shape)} disagree")
    _check_gqa(q, kv_layer[0, 0])
    batch, heads, dim = q.shape
    page, kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    lo, hi = (1, max_context_len) if max_context_len else (int(x) for x in torch.aminmax(context_lens))
    if lo <= 0 or hi > block_tables.shape[1] * page:
        bad = [(i, n) for i, n in enumerate(context_lens.tolist())
               if n <= 0 or n > block_tables.shape[1] * page][0]
        raise ValueError(f"context_lens[{bad[0]}]={bad[1]} is outside "
                         f"1..{block_tables.shape[1] * page}")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"kv_layer needs a unit head_dim stride, got strides {kv_layer.stride()}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    block_n = 32
    splits = num_splits or _num_splits(q, kv_heads, hi, block_n)
    per_split = triton.cdiv(triton.cdiv(hi, splits), block_n) * block_n
    splits = triton.cdiv(hi, per_split)
    part_o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, kv_layer, block_tables, context_lens, part_o, part_lse, float(scale) * _LOG2E, dim,
        page, per_split, q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1),
        kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0), part_o.stride(0),
        part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, BLOCK_G=pow2(group, 16), BLOCK_N=block_n, BLOCK_D=pow2(dim, 16),
        FP32=dot_in_fp32(q, kv_layer), num_warps=4, num_stages=2)
    _decode_merge_kernel[(batch, heads)](
        part_o, part_lse, out, splits, dim, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
        BLOCK_S=pow2(splits, 2), BLOCK_D=pow2(dim))
    return out


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """Same contract as ``kernels.attention.paged_decode_attention`` (FlashDecoding: the
    context is split in up to 64 pieces, each piece's partial result merged by its lse)."""
    return paged_decode_attention_splits(q, kv_layer, block_tables, context_lens, scale,
                                         max_context_len=max_context_len)
