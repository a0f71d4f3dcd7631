"""Triton twins of ``kernels.kv_copy``: pack a piece of the paged KV cache (a token range of
one sequence, a layer range, a kv-head range) into one contiguous ``[L, 2, T, H, D]`` buffer
and scatter such a buffer back.

Callers: only ``kernels/__init__.py`` (for CUDA tensors) and the tests. Validation, errors and
the flat slot indices (``block * block_size + slot``) come from the reference module itself, so
both versions accept and reject the same arguments. In the cache, the ``H * D`` values of one
(layer, K|V, slot) for the chosen heads are contiguous, and so are they in the piece, so the
kernel copies rows of ``H * D`` elements: bandwidth-bound, no arithmetic, any dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_copy import pack_view, unpack_view
from kernels.triton_util import pow2


@triton.jit
def _kv_rows_kernel(cache_ptr, buf_ptr, slot_ptr, row_len, n_tokens,
                    stride_cl, stride_ckv, stride_cs, stride_bl, stride_bkv, stride_bt,
                    PACK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), L * 2, cdiv(H * D, BLOCK))``: for ``BLOCK_T`` tokens ``t`` of
    one (layer, K|V), copy ``BLOCK`` of the ``row_len = H * D`` elements between cache slot
    ``slots[t]`` and piece row ``t``: cache -> piece when ``PACK``, piece -> cache otherwise."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lkv = tl.program_id(1)
    e = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    layer, kv = (lkv // 2).to(tl.int64), lkv % 2
    tm = tok < n_tokens
    slot = tl.load(slot_ptr + tok, mask=tm, other=0)
    mask = tm[:, None] & (e[None, :] < row_len)
    c = cache_ptr + layer * stride_cl + kv * stride_ckv + slot[:, None] * stride_cs + e[None, :]
    b = buf_ptr + layer * stride_bl + kv * stride_bkv + tok[:, None].to(tl.int64) * stride_bt + e[None, :]
    if PACK:
        tl.store(b, tl.load(c, mask=mask), mask=mask)
    else:
        tl.store(c, tl.load(b, mask=mask), mask=mask)


def _copy(view: torch.Tensor, buf: torch.Tensor, slots: torch.Tensor, pack: bool) -> None:
    """Copy between ``view [L, 2, slots, H, D]`` (a cache view) and ``buf [L, 2, T, H, D]``."""
    layers, _, tokens, heads, dim = buf.shape
    row = heads * dim
    if not (layers and tokens and row):
        return
    block = min(pow2(row), 1024)
    block_t = max(1, 2048 // block)
    grid = (triton.cdiv(tokens, block_t), layers * 2, triton.cdiv(row, block))
    _kv_rows_kernel[grid](view, buf, slots, row, tokens, view.stride(0), view.stride(1),
                          view.stride(2), buf.stride(0), buf.stride(1), buf.stride(2),
                          PACK=pack, BLOCK_T=block_t, BLOCK=block)


def kv_pack(kv_cache: torch.Tensor, block_table, token_start: int, token_end: int,
            layer_start: int, layer_end: int, head_start: int, head_end: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``kernels.kv_copy.kv_pack``: returns the packed piece (``out`` if given)."""
    source, slots, shape = pack_view(kv_cache, block_table, token_start, token_end, layer_start,
                                     layer_end, head_start, head_end, out)
    if out is None:
        out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    _copy(source, out, slots, pack=True)
    return out


def kv_unpack(buf: torch.Tensor, kv_cache: torch.Tensor, block_table, token_start: int,
              layer_start: int, head_start: int) -> None:
    """Same contract as ``kernels.kv_copy.kv_unpack``: scatters ``buf`` into the cache in place."""
    target, slots = unpack_view(buf, kv_cache, block_table, token_start, layer_start, head_start)
    _copy(target, buf.contiguous(), slots, pack=False)
