"""Reference attention kernels over the paged KV cache, in plain PyTorch.

Callers: ``engine.model`` (through ``kernels/__init__.py``) for every attention layer; later the
ring-attention (context parallel) path uses :func:`prefill_attention_lse` and
:func:`merge_attention`. A Triton version keeps these signatures; tests compare against them.

Shapes (flat batch of ``T`` tokens, ``H`` query heads, ``KVH`` key/value heads, ``D`` head dim;
GQA: query head ``h`` reads kv head ``h // (H // KVH)``)::

    q [T, H, D]    k, v [T, KVH, D]
    kv_layer = kv[layer]: [2 (K|V), num_blocks, block_size, KVH, D]
    slot_mapping [T]: flat slot = block * block_size + slot_in_block (negative: skip)

The prefill and decode paths use ``scaled_dot_product_attention`` with ``enable_gqa`` exactly as
``transformers`` does on CPU, which is what makes greedy tokens match it bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal head_dim and "
                         f"a query head count that is a multiple of the kv head count")


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V ``[T, KVH, D]`` into ``kv_layer`` at its flat slot, in place."""
    if k.shape != v.shape or k.shape[0] != slot_mapping.shape[0] or k.shape[1:] != kv_layer.shape[3:]:
        raise ValueError(f"store_kv shapes disagree: k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"slots {tuple(slot_mapping.shape)} kv_layer {tuple(kv_layer.shape)}")
    flat = kv_layer.view(2, -1, *kv_layer.shape[3:])     # [2, blocks*block_size, KVH, D]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat[0, slot_mapping] = k.to(flat.dtype)
    flat[1, slot_mapping] = v.to(flat.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention within each sequence ``cu_seqlens[i]:cu_seqlens[i+1]``; out ``[T, H, D]``."""
    _check_gqa(q, k)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=end - start > 1,
                                           scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def prefill_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, scale: float, causal: bool = True,
                          cu_seqlens_k: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of the scaled scores, for partial results.

    Returns ``(out [T, H, D] in q's dtype, lse [T, H] fp32)`` with
    ``lse[t, h] = log(sum_j exp(scale * q[t, h] . k[j, h // group]))`` over the keys query ``t``
    may see. Keys of sequence ``i`` are ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` (default: the query
    bounds). ``causal`` aligns the last query with the last key (query ``r`` of ``Lq`` sees key
    ``c`` of ``Lk`` when ``c <= r + Lk - Lq``). A query that sees no key gets out 0, lse -inf,
    so :func:`merge_attention` ignores it. Explicit fp32 math (the ring-attention reference).
    """
    _check_gqa(q, k)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if cu_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} and cu_seqlens_k "
                         f"{tuple(cu_k.shape)} must list the same number of sequences")
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    bq, bk = cu_seqlens.tolist(), cu_k.tolist()
    for qa, qb, ka, kb in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if qb == qa or kb == ka:
            continue
        qs = q[qa:qb].float().transpose(0, 1)                                   # [H, Lq, D]
        ks = k[ka:kb].float().transpose(0, 1).repeat_interleave(group, dim=0)   # [H, Lk, D]
        vs = v[ka:kb].float().transpose(0, 1).repeat_interleave(group, dim=0)
        s = torch.matmul(qs, ks.transpose(1, 2)) * scale                        # [H, Lq, Lk]
        if causal:
            lq, lk = qb - qa, kb - ka
            rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            s = s.masked_fill(torch.arange(lk, device=q.device)[None, :] > rows, float("-inf"))
        m = torch.logsumexp(s, dim=-1)                                          # [H, Lq]
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)                         # rows all -inf -> 0
        out[qa:qb] = torch.matmul(p, vs).transpose(0, 1).to(q.dtype)
        lse[qa:qb] = m.transpose(0, 1)
    return out, lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (``[T, H, D]``, ``[T, H]``)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    out = (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype)
    return out, lse


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """One query token per sequence ``q [B, H, D]`` against its paged context; out ``[B, H, D]``.

    Sequence ``b`` reads its first ``context_lens[b]`` tokens through ``block_tables[b]``
    (the current token's K/V must already be stored). ``max_context_len``: a bound on every
    ``context_lens[b]`` known to the caller, which lets a device kernel skip reading the
    lengths back to the host (CUDA graph capture); the reference reads them anyway.
    """
    if q.shape[0] != block_tables.shape[0] or q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"batch of q {tuple(q.shape)}, block_tables {tuple(block_tables.shape)} "
                         f"and context_lens {tuple(context_lens.shape)} disagree")
    _check_gqa(q, kv_layer[0, 0])
    block_size = kv_layer.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        if n <= 0 or n > block_tables.shape[1] * block_size:
            raise ValueError(f"context_lens[{b}]={n} is outside 1..{block_tables.shape[1] * block_size}")
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        ctx = kv_layer[:, blocks].flatten(1, 2)[:, :n]                  # [2, n, KVH, D]
        ks, vs = (ctx[i].transpose(0, 1).unsqueeze(0).to(q.dtype) for i in (0, 1))
        o = F.scaled_dot_product_attention(q[b][None, :, None], ks, vs, scale=scale, enable_gqa=True)
        out[b] = o[0, :, 0]
    return out
