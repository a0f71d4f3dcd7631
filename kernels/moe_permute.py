"""Token permutation for mixture-of-experts layers (plain-PyTorch reference).

A top-k router sends token ``t`` to experts ``topk_ids[t, 0..k-1]``: ``T*k`` (token, expert)
*pairs*, numbered ``p = t*k + j``. Experts run fastest on contiguous rows, so the pairs are
grouped by expert first:

    order    = stable argsort of topk_ids.flatten()          # [T*k] pair numbers, by expert
    x_sorted = x[order // k]                                 # [T*k, H] rows, expert 0's first
    counts   = bincount(topk_ids.flatten(), minlength=E)     # [E] rows per expert

so expert ``e`` owns rows ``[offsets[e], offsets[e+1])`` of ``x_sorted`` with
``offsets = [0, cumsum(counts)]``. After the experts ran, :func:`moe_unpermute` scatters rows
back to their tokens, each scaled by its router weight:

    out[t] = sum over rows r with order[r] // k == t of  w.flatten()[order[r]] * y[r]

Callers: ``engine.moe.MoEBlock`` only. A Triton/CUDA version (a later issue) must keep these
signatures and return the same tensors; ``order`` may be any slice of the full order (expert
parallelism unpermutes only the rows of its own experts).
"""
from __future__ import annotations

import torch


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, H]``, ``topk_ids [T, k]`` (int) -> ``(x_sorted [T*k, H], order [T*k] int64,
    counts [E] int64)`` as in the module docstring."""
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute needs x [T, H] and topk_ids [T, k], got "
                         f"{tuple(x.shape)} and {tuple(topk_ids.shape)}")
    flat = topk_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids span [{int(flat.min())}, {int(flat.max())}], "
                         f"outside [0, {num_experts})")
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return x[order // topk_ids.shape[1]], order, counts


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor,
                  num_tokens: int) -> torch.Tensor:
    """``y [R, H]`` expert outputs for pairs ``order [R]`` -> ``out [num_tokens, H]`` (dtype of
    ``y``): each row times its router weight ``topk_weights [T, k]``, summed per token."""
    if y.shape[0] != order.shape[0]:
        raise ValueError(f"moe_unpermute: {y.shape[0]} rows but {order.shape[0]} pair numbers")
    k = topk_weights.shape[1]
    w = topk_weights.reshape(-1)[order]
    out = torch.zeros(num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
    out.index_add_(0, order // k, (y * w[:, None]).to(y.dtype))
    return out
