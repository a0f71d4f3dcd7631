"""Ring attention: causal prefill attention for one sequence split across context-parallel ranks.

Caller: ``engine.model`` (the prefill path, when ``groups.cp.size > 1``) calls
:func:`ring_prefill_attention` in every attention layer on every CP rank at the same time (it
is collective over ``cp_group``). Each CP rank holds a subset of the prompt's tokens (its
chunks from ``common.layout.cp_token_ranges``: zigzag, non-contiguous) and their global
``positions``; the result for its query tokens equals full causal attention over the whole
prompt. Plain PyTorch, explicit fp32 maths: the reference a Triton twin will be tested against.

Algorithm (``n = cp_group.size`` steps, rank ``r``)::

    block_0 = (K_r, V_r)                      # this rank's own keys and values
    for s in 0 .. n-1:
        post isend(block_s -> rank r+1), irecv(block_{s+1} <- rank r-1)   # unless s == n-1
        (o_s, lse_s) = attention(Q_r, block_s) with mask  pos_q >= pos_k
        (O, LSE) = merge((O, LSE), (o_s, lse_s))
        wait for the sends/receives                                        # overlap with compute

so at step ``s`` rank ``r`` holds the K/V block of rank ``(r - s) mod n`` and after ``n`` steps
every query has seen every key. Block sizes may differ (uneven chunks, ranks with no token):
they and the key positions are exchanged once up front with two ``all_gather``s, so each
receive buffer has its exact size and empty blocks are neither sent nor received.

Log-sum-exp merge of partial attentions over disjoint key sets ``A`` and ``B`` (per query
and head, ``s_j = scale * q . k_j``)::

    lse_X = log sum_{j in X} exp(s_j),     o_X = sum_{j in X} exp(s_j - lse_X) v_j
    lse   = log(exp(lse_A) + exp(lse_B))
    o     = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B

A query that sees no key of a block has ``lse = -inf`` and ``o = 0`` there, so it adds
nothing (``kernels.merge_attention`` turns its ``exp(-inf - -inf)`` NaN weight into 0).
"""
from __future__ import annotations

import torch

from kernels.attention import merge_attention


def masked_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                           k_pos: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of queries ``q [Tq, H, D]`` over one key block ``k, v [Tk, KVH, D]``.

    Query ``t`` sees key ``j`` when ``q_pos[t] >= k_pos[j]`` (causal by global position, so any
    chunking works). Returns ``(out [Tq, H, D] fp32, lse [Tq, H] fp32)``; a query seeing no key
    gets ``out = 0, lse = -inf``. GQA: query head ``h`` reads kv head ``h // (H // KVH)``.
    """
    tq, h = q.shape[:2]
    out = torch.zeros((tq, h, q.shape[2]), dtype=torch.float32, device=q.device)
    lse = torch.full((tq, h), float("-inf"), dtype=torch.float32, device=q.device)
    if tq == 0 or k.shape[0] == 0 or int(q_pos.max()) < int(k_pos.min()):
        return out, lse                                       # nothing visible: contributes nothing
    group = h // k.shape[1]
    qs = q.float().transpose(0, 1)                                          # [H, Tq, D]
    ks = k.float().transpose(0, 1).repeat_interleave(group, dim=0)          # [H, Tk, D]
    vs = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    s = torch.matmul(qs, ks.transpose(1, 2)) * scale                        # [H, Tq, Tk]
    if int(q_pos.min()) < int(k_pos.max()):                                 # some key is in the future
        s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    m = torch.logsumexp(s, dim=-1)                                          # [H, Tq]
    p = torch.exp(s - m[..., None]).nan_to_num(0.0)                         # rows all -inf -> 0
    return torch.matmul(p, vs).transpose(0, 1), m.transpose(0, 1)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"ring attention needs q [T, H, D] and k, v [T, KVH, D] of one shape, got "
                         f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or positions.shape != (q.shape[0],):
        raise ValueError(f"token counts disagree: q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"positions {tuple(positions.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need equal head_dim and a query "
                         f"head count that is a multiple of the kv head count")


def _exchange_positions(positions: torch.Tensor, cp_group) -> list[torch.Tensor]:
    """Every rank's key positions (exact sizes), by group rank: two all_gathers."""
    dev = positions.device                                   # NCCL groups move device tensors only
    sizes = cp_group.all_gather(torch.tensor([positions.numel()], dtype=torch.int64, device=dev))
    counts = [int(c) for c in torch.cat(sizes).tolist()]
    padded = torch.zeros(max(counts), dtype=torch.int64, device=dev)
    padded[: positions.numel()] = positions.to(torch.int64)
    gathered = cp_group.all_gather(padded)
    return [g[:c] for g, c in zip(gathered, counts)]


def ring_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cp_group, scale: float) -> torch.Tensor:
    """Causal attention of this rank's query tokens over the whole prompt, held across ``cp_group``.

    ``q [T, H, D]``, ``k, v [T, KVH, D]``: this rank's tokens of ONE sequence (any subset of the
    prompt, possibly empty or non-contiguous); ``positions [T]`` their global positions.
    ``cp_group`` is an ``engine.parallel.Group`` (collective: every rank of it must call this
    with the same head shapes and dtype). Returns ``out [T, H, D]`` in q's dtype. With one rank
    it is plain causal attention over the local tokens.
    """
    _check_inputs(q, k, v, positions)
    n, me = cp_group.size, cp_group.rank
    if n == 1:
        out, _ = masked_block_attention(q, k, v, positions, positions, scale)
        return out.to(q.dtype)
    key_pos = _exchange_positions(positions, cp_group)
    nxt, prv = (me + 1) % n, (me - 1) % n                 # group ranks
    block = torch.stack((k, v)).contiguous()                 # [2, T, KVH, D]: one message per step
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for step in range(n):
        src = (me - step) % n                                # group rank whose K/V ``block`` is
        pending, incoming = [], None
        if step < n - 1:
            if block.shape[1] > 0:                           # every rank knows every block's size
                pending.append(cp_group.isend(block, nxt))
            size = key_pos[(src - 1) % n].numel()
            incoming = block.new_empty((2, size, *block.shape[2:]))
            if size > 0:
                pending.append(cp_group.irecv(incoming, prv))
        o_s, lse_s = masked_block_attention(q, block[0], block[1], positions, key_pos[src], scale)
        out, lse = merge_attention(out, lse, o_s, lse_s)
        for work in pending:
            work.wait()
        block = incoming
    return out.to(q.dtype)
