"""Reference attention kernels over the paged KV cache, in plain PyTorch.

Callers: ``engine.model`` (through ``kernels/__init__.py``) for every attention layer; later the
ring-attention (context parallel) path uses :func:`prefill_attention_lse` and
:func:`merge_attention`. A prefill whose leading tokens are already cached (prefix caching,
later chunked prefill) attends through the paged cache with :func:`paged_prefill_attention`. A Triton version keeps these signatures; tests compare against them.

Shapes (flat batch of ``T`` tokens, ``H`` query heads, ``KVH`` key/value heads, ``D`` head dim;
GQA: query head ``h`` reads kv head ``h // (H // KVH)``)::

    q [T, H, D]    k, v [T, KVH, D]
    kv_layer = kv[layer]: [2 (K|V), num_blocks, block_size, KVH, D]
    slot_mapping [T]: flat slot = block * block_size + slot_in_block (negative: skip)

The prefill and decode paths use ``scaled_dot_product_attention`` with ``enable_gqa`` exactly as
``transformers`` does on CPU, which keeps the logits within fp32 rounding of its and the greedy
tokens equal to its (tests/engine/test_parity.py checks the margins that make that sound). Paged
decode runs the whole batch in one SDPA call (a few when the lengths differ widely or the
batch's K/V is large); :func:`paged_decode_attention_reference` keeps the one call per
sequence, the oracle.
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


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Prefill with context: new tokens attend to their sequence's paged context, causally.

    ``q [T, H, D]``: the flat batch of new tokens, sequence ``i`` being rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (``cu_seqlens [B+1]`` int32, ``Lq`` rows). Its context is
    its first ``context_lens[i]`` tokens (``Lk``, ``context_lens [B]`` int32) read through
    ``block_tables[i]`` (``[B, max_blocks]`` int32, padded) from ``kv_layer``
    ``[2, num_blocks, block_size, KVH, D]``; the new tokens' K/V must already be stored there
    (``store_kv``), as the last ``Lq`` of those ``Lk`` tokens: a cached prefix of ``Lk - Lq``
    tokens (a prefix-cache hit, or the earlier chunks of a chunked prefill) then the new ones.
    New token ``r`` sees context positions ``c <= r + Lk - Lq`` (the causal mask aligned
    bottom-right; SDPA's ``is_causal`` aligns top-left, wrong for ``Lq < Lk``, so the mask is
    explicit). Returns ``[T, H, D]`` in q's dtype; ``Lq == Lk`` equals :func:`prefill_attention`
    within rounding (another SDPA kernel). One SDPA call (``enable_gqa``) per sequence.

    Raises ``ValueError`` when the batch sizes disagree, ``cu_seqlens`` does not end at ``T``,
    a sequence has more new tokens than context, or a context does not fit its block table.
    """
    _check_gqa(q, kv_layer[0, 0])
    bounds, lens = cu_seqlens.tolist(), context_lens.tolist()
    if len(bounds) != len(lens) + 1 or block_tables.shape[0] != len(lens) or bounds[-1] != q.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, cu_seqlens {tuple(cu_seqlens.shape)} ending at "
                         f"{bounds[-1] if bounds else None}, block_tables {tuple(block_tables.shape)} "
                         f"and context_lens {tuple(context_lens.shape)} disagree")
    block_size = kv_layer.shape[2]
    cap = block_tables.shape[1] * block_size
    out = torch.empty_like(q)
    for i, (start, end, lk) in enumerate(zip(bounds[:-1], bounds[1:], lens)):
        lq = end - start
        if not 0 <= lq <= lk <= cap:
            raise ValueError(f"sequence {i}: {lq} new tokens and context_lens={lk} need "
                             f"0 <= new <= context <= {cap} (its block table's capacity)")
        if lq == 0:
            continue
        blocks = block_tables[i, : -(-lk // block_size)].long()
        ctx = kv_layer[:, blocks].flatten(1, 2)[:, :lk]                 # [2, Lk, KVH, D]
        ks, vs = (ctx[j].transpose(0, 1).unsqueeze(0).to(q.dtype) for j in (0, 1))
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        mask = torch.arange(lk, device=q.device)[None, :] <= rows       # [Lq, Lk], True: attend
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1).unsqueeze(0), ks, vs,
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets (``[T, H, D]``, ``[T, H]``)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    out = (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype)
    return out, lse


# A batched decode call pads every sequence of a group to the group's longest context. A
# shorter sequence joins a group while the padded tokens stay within DECODE_PAD_RATIO times the
# real ones plus DECODE_PAD_TOKENS (a short batch stays one call: a call costs about as much as
# a few hundred tokens), and while the gathered K/V stays within DECODE_GATHER_BYTES (one
# sequence alone may exceed it, as in the per-sequence reference). That budget bounds the
# transient memory and keeps the gathered K/V in cache for SDPA to read: on 2 cores (4 MiB L2)
# 16 MiB was the fastest of 1..256 MiB at 64 x 1024-2048 tokens (bench/cpu_attention.py).
DECODE_PAD_RATIO = 1.5
DECODE_PAD_TOKENS = 256
DECODE_GATHER_BYTES = 16 << 20


def _decode_lengths(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor) -> list[int]:
    """Check the decode arguments (``ValueError`` naming the culprit); return the lengths."""
    if q.shape[0] != block_tables.shape[0] or q.shape[0] != context_lens.shape[0]:
        raise ValueError(f"batch of q {tuple(q.shape)}, block_tables {tuple(block_tables.shape)} "
                         f"and context_lens {tuple(context_lens.shape)} disagree")
    _check_gqa(q, kv_layer[0, 0])
    lens, cap = context_lens.tolist(), block_tables.shape[1] * kv_layer.shape[2]
    for b, n in enumerate(lens):
        if n <= 0 or n > cap:
            raise ValueError(f"context_lens[{b}]={n} is outside 1..{cap}")
    return lens


def paged_decode_attention_reference(q: torch.Tensor, kv_layer: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float, max_context_len: int | None = None
                                     ) -> torch.Tensor:
    """The oracle for every paged decode kernel: one SDPA call per sequence over its gathered
    context. Same contract as :func:`paged_decode_attention`; tests compare the batched CPU
    version and the Triton kernel against it."""
    lens = _decode_lengths(q, kv_layer, block_tables, context_lens)
    block_size = kv_layer.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(lens):
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        ctx = kv_layer[:, blocks].flatten(1, 2)[:, :n]                  # [2, n, KVH, D]
        ks, vs = (ctx[i].transpose(0, 1).unsqueeze(0).to(q.dtype) for i in (0, 1))
        o = F.scaled_dot_product_attention(q[b][None, :, None], ks, vs, scale=scale, enable_gqa=True)
        out[b] = o[0, :, 0]
    return out


def decode_groups(lens: list[int], token_bytes: int) -> list[list[int]]:
    """Split batch rows into groups that one padded call serves (see ``DECODE_PAD_RATIO``):
    rows sorted longest first, each group padded to its first row's length. ``token_bytes``:
    K+V bytes of one context token. Returns row indices per group, every row exactly once."""
    groups: list[list[int]] = []
    real = 0
    for b in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if groups:
            padded = (len(groups[-1]) + 1) * lens[groups[-1][0]]
            if (padded <= DECODE_PAD_RATIO * (real + lens[b]) + DECODE_PAD_TOKENS
                    and padded * token_bytes <= DECODE_GATHER_BYTES):
                groups[-1].append(b)
                real += lens[b]
                continue
        groups.append([b])
        real = lens[b]
    return groups


def _decode_group(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, longest: int, ragged: bool, scale: float
                  ) -> torch.Tensor:
    """One SDPA call for ``G`` sequences padded to ``longest`` tokens: ``q [G, H, D]`` -> out.

    Equal lengths (``ragged`` false): each sequence's whole blocks, one ``index_select`` of
    block rows for K and one for V, cut at ``longest``; no mask. Ragged: one ``index_select``
    of token rows, the slots past a sequence's length repeating its last token (so only its
    own stored K/V is read, never a stale slot or a padding block id) and masked.
    """
    block_size, kv_heads, dim = kv_layer.shape[2:]
    width = -(-longest // block_size)
    blocks = block_tables[:, :width].long()                                          # [G, W]
    mask = None
    if ragged:
        rows = (blocks[:, :, None] * block_size
                + torch.arange(block_size, device=q.device)).flatten(1)[:, :longest]  # [G, L]
        mask = torch.arange(longest, device=q.device) < context_lens[:, None]      # [G, L]
        rows = torch.where(mask, rows, rows.gather(1, context_lens.long()[:, None] - 1))
        mask = mask[:, None, None, :]
        row_tokens = 1
    else:
        rows, row_tokens = blocks, block_size
    k, v = (kv_layer[i].reshape(-1, row_tokens * kv_heads * dim).index_select(0, rows.flatten())
            .view(rows.shape[0], -1, kv_heads, dim)[:, :longest].transpose(1, 2).to(q.dtype)
            for i in (0, 1))                                                  # [G, KVH, L, D]
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[:, :, 0]


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """One query token per sequence ``q [B, H, D]`` against its paged context; out ``[B, H, D]``.

    Sequence ``b`` reads its first ``context_lens[b]`` tokens through ``block_tables[b]``
    (the current token's K/V must already be stored). ``max_context_len``: a bound on every
    ``context_lens[b]`` known to the caller, which lets a device kernel skip reading the
    lengths back to the host (CUDA graph capture); here the lengths are read anyway.

    The CPU path (``kernels`` dispatches CPU tensors here): the batch in a few length groups
    (:func:`decode_groups`; one group when the lengths are close), each one K/V gather
    (``index_select`` of block or token rows) and one SDPA call, no per-sequence loop. Equal to
    :func:`paged_decode_attention_reference` within rounding: a batched SDPA call may block
    its reductions differently from one call per sequence (padding does; so does the vendor
    kernel on some CPUs, e.g. an AMD EPYC even for equal lengths), so never assume bit for bit.
    """
    lens = _decode_lengths(q, kv_layer, block_tables, context_lens)
    if not lens:
        return torch.empty_like(q)
    token_bytes = 2 * kv_layer[0, 0, 0].numel() * kv_layer.element_size()
    groups = decode_groups(lens, token_bytes)
    if len(groups) == 1:
        return _decode_group(q, kv_layer, block_tables, context_lens, max(lens),
                             min(lens) != max(lens), scale)
    out = torch.empty_like(q)
    for rows in groups:
        idx = torch.tensor(rows, device=q.device)
        ragged = lens[rows[-1]] != lens[rows[0]]
        out[idx] = _decode_group(q[idx], kv_layer, block_tables[idx], context_lens[idx],
                                 lens[rows[0]], ragged, scale)
    return out
