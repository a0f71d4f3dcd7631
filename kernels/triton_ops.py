"""Triton twins of ``kernels.ops``: RMSNorm (fused with the residual add), rotary embedding and
SiLU-and-mul, with the references' signatures, return values and dtypes.

Callers: only ``kernels/__init__.py`` (for CUDA tensors) and the tests. Every kernel loads its
inputs, computes in fp32 and rounds where the reference rounds (the residual sum, the normed
value before the weight, the rope cos/sin table, SiLU before the multiply), so fp32 results agree
with the reference to float rounding and bf16 ones to about one bf16 ulp. None works in place:
all return new tensors, as the references do. Inputs may be strided views (``q``/``k``/``v``
come out of one fused projection) as long as the last dim is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_util import TL_DTYPE, pow2


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as 2-D ``[rows, last]`` with a unit last stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_s,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row (grid ``(rows,)``), the whole row in one block of ``BLOCK >= n_cols``:
    ``s = x + res`` (rounded to the sum dtype and stored), ``out = w * (s * rsqrt(mean(s^2) +
    eps)).to(s dtype)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
        x = s
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """Same contract as ``kernels.ops.rms_norm``: ``out`` or ``(out, x + residual)``."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    total = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    x2 = _rows(x)
    if x2.shape[0]:
        r2 = _rows(residual) if residual is not None else x2
        s2 = total.view(-1, hidden) if total is not None else out.view(-1, hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), out.view(-1, hidden), s2, hidden, float(eps),
            x2.stride(0), r2.stride(0), hidden, hidden,
            HAS_RES=residual is not None, BLOCK=pow2(hidden), num_warps=min(max(hidden // 512, 1), 16))
    return out if residual is None else (out, total)


@triton.jit
def _rope_kernel(x_ptr, out_ptr, pos_ptr, cache_ptr, n_heads, half,
                 stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
                 COS_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid ``(tokens, cdiv(heads, BLOCK_H))``: rotate ``BLOCK_H`` heads of one token,
    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` over the two halves of ``head_dim``, with
    cos/sin read from row ``positions[t]`` of the cache and rounded to ``COS_DTYPE`` (q's
    dtype) as the reference does."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dm = d < half
    cos = tl.load(cache_ptr + pos * stride_c + d, mask=dm, other=0.0).to(COS_DTYPE).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + half + d, mask=dm, other=0.0).to(COS_DTYPE).to(tl.float32)
    mask = (heads[:, None] < n_heads) & dm[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)


def _rope_one(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
              cos_dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, heads, dim = x.shape
    if tokens and heads:
        block_h = min(pow2(heads), 16)
        _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
            x, out, positions, cache, heads, dim // 2, x.stride(0), x.stride(1),
            out.stride(0), out.stride(1), cache.stride(0),
            COS_DTYPE=cos_dtype, BLOCK_H=block_h, BLOCK_HALF=pow2(dim // 2))
    return out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``kernels.ops.rotary_embedding``: new rotated ``(q, k)``."""
    if q.shape[-1] != cos_sin_cache.shape[-1] or k.shape[-1] != cos_sin_cache.shape[-1]:
        raise ValueError(f"head_dim of q {tuple(q.shape)} / k {tuple(k.shape)} does not match "
                         f"the rope cache {tuple(cos_sin_cache.shape)}")
    if q.dtype not in TL_DTYPE:
        raise ValueError(f"rotary_embedding: unsupported dtype {q.dtype}")
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    positions = positions.contiguous()
    cos_dtype = TL_DTYPE[q.dtype]
    return _rope_one(q, positions, cache, cos_dtype), _rope_one(k, positions, cache, cos_dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    """Grid ``(rows, cdiv(I, BLOCK))``: ``out = silu(gate).to(dtype) * up`` with ``gate =
    x[:, :I]``, ``up = x[:, I:]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as ``kernels.ops.silu_and_mul``: ``[..., 2I] -> [..., I]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {tuple(x.shape)}")
    inner = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inner, dtype=x.dtype, device=x.device)
    x2 = _rows(x)
    if x2.shape[0] and inner:
        block = min(pow2(inner), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inner, block))](
            x2, out.view(-1, inner), inner, x2.stride(0), inner, BLOCK=block)
    return out
