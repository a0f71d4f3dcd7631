"""Triton twins of ``kernels.moe_permute``: group (token, expert) pairs by expert and scatter
the experts' rows back, with the references' signatures and return values.

Callers: only ``kernels/__init__.py`` (for CUDA tensors) and the tests. The stable argsort of
the reference is a counting sort here, which gives the identical ``order``:

    counts[e]  = #{p : ids[p] == e}                           (_count_kernel, one program per e)
    offsets    = exclusive cumsum of counts                   (torch, E values)
    order[offsets[e] + #{p' < p : ids[p'] == e}] = p          (_order_kernel, one program per e)
    x_sorted[r] = x[order[r] // k]                            (_gather_kernel)

Each program of the two index kernels scans all ``T*k`` ids (``E * T * k`` loads in all: fine
for decode batches and prefill chunks of a few thousand tokens). Unpermute is a gather, not an
atomic scatter-add, so it is deterministic: ``inv[order[r]] = r`` (-1 for pairs not in
``order``), then every token sums its ``k`` rows ``w[t*k+j] * y[inv[t*k+j]]`` in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_util import pow2

_SCAN = 1024    # ids per step of the index kernels


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    """Grid ``(E,)``: ``counts[e] = sum(ids == e)``."""
    e = tl.program_id(0)
    total = tl.zeros([BLOCK], tl.int64)
    for p0 in range(0, n, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        total += (tl.load(ids_ptr + p, mask=p < n, other=-1) == e).to(tl.int64)
    tl.store(counts_ptr + e, tl.sum(total, 0))


@triton.jit
def _order_kernel(ids_ptr, offsets_ptr, order_ptr, n, BLOCK: tl.constexpr):
    """Grid ``(E,)``: write expert ``e``'s pair numbers, ascending, to ``order[offsets[e]:]``."""
    e = tl.program_id(0)
    base = tl.load(offsets_ptr + e)
    for p0 in range(0, n, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        hit = tl.load(ids_ptr + p, mask=p < n, other=-1) == e
        rank = tl.cumsum(hit.to(tl.int32), 0)
        tl.store(order_ptr + base + rank - 1, p.to(tl.int64), mask=hit)
        base += tl.sum(hit.to(tl.int32), 0).to(tl.int64)


@triton.jit
def _gather_kernel(x_ptr, order_ptr, out_ptr, hidden, stride_x, stride_o, TOPK: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Grid ``(R, cdiv(H, BLOCK))``: ``out[r] = x[order[r] // TOPK]``."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(order_ptr + r) // TOPK
    mask = cols < hidden
    tl.store(out_ptr + r * stride_o + cols, tl.load(x_ptr + src * stride_x + cols, mask=mask),
             mask=mask)


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.moe_permute.moe_permute``: ``(x_sorted, order, counts)``."""
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute needs x [T, H] and topk_ids [T, k], got "
                         f"{tuple(x.shape)} and {tuple(topk_ids.shape)}")
    flat = topk_ids.reshape(-1).contiguous()
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids span [{lo}, {hi}], outside [0, {num_experts})")
    n, k, hidden = flat.numel(), topk_ids.shape[1], x.shape[1]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    order = torch.empty(n, dtype=torch.int64, device=x.device)
    out = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    if n == 0 or num_experts == 0:
        return out, order, counts
    _count_kernel[(num_experts,)](flat, counts, n, BLOCK=_SCAN)
    offsets = torch.cumsum(counts, 0) - counts
    _order_kernel[(num_experts,)](flat, offsets, order, n, BLOCK=_SCAN)
    if hidden:
        x = x if x.stride(1) == 1 else x.contiguous()
        block = min(pow2(hidden), 1024)
        _gather_kernel[(n, triton.cdiv(hidden, block))](
            x, order, out, hidden, x.stride(0), out.stride(0), TOPK=k, BLOCK=block)
    return out, order, counts


@triton.jit
def _inverse_kernel(order_ptr, inv_ptr, n, BLOCK: tl.constexpr):
    """Grid ``(cdiv(R, BLOCK),)``: ``inv[order[r]] = r``."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < n
    tl.store(inv_ptr + tl.load(order_ptr + r, mask=mask, other=0), r.to(tl.int64), mask=mask)


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, hidden, n_pairs, stride_y, stride_o,
                    TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(tokens, cdiv(H, BLOCK))``: ``out[t] = sum_j (w[p] * y[inv[p]]).to(dtype)`` over
    pairs ``p = t*TOPK + j`` that have a row (``inv[p] >= 0``), summed in fp32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < hidden
    ty = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOPK):
        p = t * TOPK + j
        r = tl.load(inv_ptr + p, mask=p < n_pairs, other=-1)
        w = tl.load(w_ptr + p, mask=r >= 0, other=0.0).to(tl.float32)
        live = cols < tl.where(r >= 0, hidden, 0)        # cm, and only for a pair with a row
        row = tl.load(y_ptr + r * stride_y + cols, mask=live, other=0.0).to(tl.float32)
        acc += (row * w).to(ty).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(ty), mask=cm)


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor,
                  num_tokens: int) -> torch.Tensor:
    """Same contract as ``kernels.moe_permute.moe_unpermute``: ``out [num_tokens, H]``."""
    if y.shape[0] != order.shape[0]:
        raise ValueError(f"moe_unpermute: {y.shape[0]} rows but {order.shape[0]} pair numbers")
    k, hidden = topk_weights.shape[1], y.shape[1]
    weights = topk_weights.reshape(-1).contiguous()
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if num_tokens == 0 or hidden == 0:
        return out
    inv = torch.full((weights.numel(),), -1, dtype=torch.int64, device=y.device)
    if order.numel():
        _inverse_kernel[(triton.cdiv(order.numel(), _SCAN),)](order.contiguous(), inv,
                                                              order.numel(), BLOCK=_SCAN)
    y = y if y.stride(1) == 1 else y.contiguous()
    block = min(pow2(hidden), 1024)
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y, inv, weights, out, hidden, weights.numel(), y.stride(0), out.stride(0),
        TOPK=k, BLOCK=block)
    return out
